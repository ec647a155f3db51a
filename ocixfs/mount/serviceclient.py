"""The host service's client: what every root ``ocixfs mount`` runs first, to hand the
mount to the resident service (``mount.service``, where the protocol is described), and
the pieces the service shares with it (its paths, ``bind``, ``read_line``).

It imports as little as it can, since a cold page cache makes every module a disk read
of the start of each container: ``socket``, ``json``, ``signal`` and ``ocixfs.errors``;
paths are ``str`` (no ``pathlib``), context managers are classes (no ``contextlib``), type
names come from ``TYPE_CHECKING`` alone (no ``typing``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys

from ocixfs.errors import OcixError
from ocixfs.mount.runtime import runtime_dir_name
from ocixfs.safefs import checked_private_directory

TYPE_CHECKING = False  # (not typing's: see the module docstring)
if TYPE_CHECKING:
    import logging
    from collections.abc import Sequence
    from types import FrameType, TracebackType
    from typing import Any

__all__ = [
    "BYPASS_ENV",
    "SERVICE_DIR_ENV",
    "SOCKET_NAME",
    "ServiceError",
    "ServicePaths",
    "ask_service",
    "bind",
    "code_version",
    "connect",
    "enter_worker",
    "identity",
    "locked",
    "mount_through_service",
    "read_line",
    "service_paths",
    "stop_service",
    "try_connect",
]


def _log() -> logging.Logger:
    """This module's logger; ``logging`` is imported only when something is said."""
    import logging

    return logging.getLogger(__name__)


SERVICE_DIR_ENV = "OCIXFS_SERVICE_DIR"
SOCKET_NAME = "service.sock"
BYPASS_ENV = "OCIXFS_NO_SERVICE"
SOCKET_MODE = 0o600
HANDSHAKE_TIMEOUT = 10.0   # a running service forks a worker in milliseconds
START_TIMEOUT = 60.0       # a service just started imports first (cold disk: seconds)
MAX_REQUEST = 1 << 20
STOP_WAIT = 10.0
STALE_CODE = "stale code"
_STALE = -1  # not an exit status: _delegate's "start the service anew"
SYSTEMD_BOOTED = "/run/systemd/system"
_CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_in_worker = False  # True in a child of the service: its mounts never ask the service


def enter_worker() -> None:
    """Called in each child of the service: mounts made there never ask the service."""
    global _in_worker
    _in_worker = True


class ServiceError(OcixError):
    """The service's socket or directory is not what it must be (one line for the user)."""


class ServicePaths:
    """Where the service lives: its socket, the lock taken to start it, its log."""

    __slots__ = ("directory",)

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, SOCKET_NAME)

    @property
    def lock(self) -> str:
        return os.path.join(self.directory, "service.lock")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, "service.log")


def service_paths(*, create: bool = False) -> ServicePaths:
    """The service's directory: ``$OCIXFS_SERVICE_DIR``, else the runtime directory
    (``/run/ocixfs`` for root), checked private whenever it exists (``UnsafePathError``)."""
    given = os.environ.get(SERVICE_DIR_ENV)
    if not given:
        return ServicePaths(runtime_dir_name(create=create))
    if create or os.path.lexists(given):
        return ServicePaths(checked_private_directory(given, what="service directory"))
    return ServicePaths(given)


def identity() -> str:
    """What a client and a service must share to serve each other's mounts: the same
    ocixfs, run by the same interpreter."""
    import ocixfs

    return f"{ocixfs.__version__} {os.path.realpath(sys.executable)} {ocixfs.__file__}"


def code_version() -> str:
    """The newest modification time of the package's modules: a service that imported
    older code than the files now hold (ocixfs was upgraded) is stopped and started anew
    by the next mount."""
    import ocixfs

    newest = 0
    pending = [os.path.dirname(ocixfs.__file__)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                    pending.append(entry.path)
                elif entry.name.endswith(".py"):
                    newest = max(newest, entry.stat().st_mtime_ns)
    return str(newest)


# ----------------------------------------------------------------------------------------
# The client


def mount_through_service(argv: Sequence[str]) -> int | None:
    """Run ``ocixfs ARGV`` (a mount) in the service, starting it if needed, and return
    its exit status; what it prints goes to this process's stdout and stderr. None when
    the service is not for this caller (not root, ``OCIXFS_NO_SERVICE`` set, already in a
    worker, another mount namespace or ocixfs): the caller then mounts in-process.
    Raises ``ServiceError`` (or ``UnsafePathError``) for a socket or directory that is
    not the service's."""
    if _in_worker or os.geteuid() != 0 or os.environ.get(BYPASS_ENV):
        return None
    try:
        paths = service_paths(create=True)
        code = code_version()
        for _attempt in range(2):
            conn = connect(paths, start=not _systemd_runs_the_host())
            if conn is None:
                return None
            with conn:
                status = _delegate(conn, argv, code)
            if status != _STALE:
                return status
            _log().debug("the ocixfs service runs older code; starting it anew")
            stop_service(paths, unless_code=code)
    except (OSError, ValueError) as exc:  # a read-only /run, an answer cut short...
        _log().debug("no ocixfs service (%s); mounting in this process", exc)
    return None


def _systemd_runs_the_host() -> bool:
    """Under systemd, a service started by a mount would live in the cgroup of whatever
    ran that mount (a unit, a login session) and die with it, taking along every mount it
    made since: there the service runs only as its own unit (``systemd/ocixfs.socket``),
    and without it mounts stay in-process. (sd_booted(3): this directory exists.)"""
    return os.path.isdir(SYSTEMD_BOOTED)


def connect(paths: ServicePaths, *, start: bool) -> socket.socket | None:
    """A connection to the running service; with ``start``, one started first if none
    answers (a stale socket is replaced). None if there is none (or it could not start).
    Raises ``ServiceError`` for a socket that is not the service's or refuses us."""
    conn = try_connect(paths.socket)
    if conn is not None or not start:
        return conn
    with locked(paths.lock):
        conn = try_connect(paths.socket)  # another first mount may have started it
        if conn is None:
            _start_service(paths)
            conn = try_connect(paths.socket)
    if conn is not None:
        conn.settimeout(START_TIMEOUT)
    return conn


def ask_service(conn: socket.socket, op: str, **args: str) -> dict[str, Any]:
    """One ``status``/``stop`` request on ``conn``; its JSON answer."""
    conn.settimeout(HANDSHAKE_TIMEOUT)
    conn.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
    answer: dict[str, Any] = json.loads(read_line(conn) or b"{}")
    return answer


def stop_service(paths: ServicePaths, *, unless_code: str | None = None) -> int | None:
    """Stop the running service (unless it runs ``unless_code``: another client has
    already started it anew) and wait until it has exited; its pid, None if none ran.
    Mounts keep serving."""
    conn = connect(paths, start=False)
    if conn is None:
        return None
    with conn:
        args = {} if unless_code is None else {"unless_code": unless_code}
        pid = ask_service(conn, "stop", **args).get("pid")
    if not isinstance(pid, int):
        return None
    from ocixfs.mount.daemon import wait_for_exit

    if not wait_for_exit(pid, STOP_WAIT):
        raise OcixError(f"the ocixfs service (pid {pid}) was asked to stop and is still "
                        f"running after {STOP_WAIT:g} s")
    return pid


def try_connect(path: str) -> socket.socket | None:
    """Connect to the socket at ``path`` after checking it is a socket that only its
    owner, this user, can connect to; None when nothing is there or nobody listens."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise ServiceError(f"service socket {path}: not a socket; remove it")
    if st.st_uid != os.geteuid():
        raise ServiceError(f"service socket {path}: owned by uid {st.st_uid}, not by you "
                           f"(uid {os.geteuid()}); remove it")
    if st.st_mode & 0o022:
        raise ServiceError(f"service socket {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                           f"others connect; remove it (the service makes it {SOCKET_MODE:04o})")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None  # gone, or stale: nobody listens
    except OSError as exc:
        conn.close()
        raise ServiceError(f"service socket {path}: {exc.strerror or exc}") from None
    return conn


class locked:  # noqa: N801 (used as a function: ``with locked(path):``)
    """An exclusive ``flock`` on the file ``path`` (made 0600 if missing) while inside."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        import fcntl

        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)


def bind(path: str) -> socket.socket:
    """A listening socket at ``path`` (a stale one replaced), mode 0600. The caller holds
    the lock, and the directory is private, so nobody can reach it meanwhile."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:  # noqa: SIM105 (no contextlib here: see the module docstring)
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _start_service(paths: ServicePaths) -> None:
    """Bind the socket and start ``ocixfs service run`` on it, detached (a new session,
    reparented to init), with a clean environment and its output in ``service.log``.
    Clients that connect before it accepts wait in the socket's backlog."""
    from ocixfs.mount.daemon import open_log_file

    log_fd = open_log_file(paths.log)
    try:
        listener = bind(paths.socket)
    except OSError as exc:
        os.close(log_fd)
        _log().debug("cannot start the ocixfs service: %s", exc)
        return
    env = {"PATH": os.environ.get("PATH", _CLEAN_PATH)}
    for name in ("PYTHONPATH", SERVICE_DIR_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    argv = [sys.executable, "-m", "ocixfs", "service", "run", "--listen-fd", "3"]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.setsid()
            if os.fork() == 0:
                _exec_detached(argv, env, listener.fileno(), log_fd)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(log_fd)
    listener.close()


def _exec_detached(argv: list[str], env: dict[str, str], listen_fd: int, log_fd: int) -> None:
    """Become ``argv`` with stdin and stdout on /dev/null, stderr on ``log_fd``, the
    listening socket as fd 3 and no other descriptor of the client's (its caller's open
    files must not live on in the service and every mount it makes)."""
    import fcntl

    listen_copy = fcntl.fcntl(listen_fd, fcntl.F_DUPFD, 10)  # above what is rearranged
    log_copy = fcntl.fcntl(log_fd, fcntl.F_DUPFD, 10)
    devnull = os.open(os.devnull, os.O_RDWR)
    for target, fd in ((0, devnull), (1, devnull), (2, log_copy), (3, listen_copy)):
        os.dup2(fd, target)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")
    os.execve(argv[0], argv, env)


def _delegate(conn: socket.socket, argv: Sequence[str], code: str) -> int | None:
    """Hand the command to the service; its exit status (None: refused; ``_STALE``: the
    service runs older code than ``code``)."""
    request = {"op": "mount", "argv": list(argv), "env": dict(os.environ),
               "umask": _umask(), "identity": identity(), "code": code}
    try:
        fds = _stdio_and_cwd()
    except OSError as exc:
        _log().debug("cannot hand this process's files to the service (%s)", exc)
        return None
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        answer = read_line(conn).decode(errors="replace").strip()
        if answer.startswith(f"refused {STALE_CODE}"):
            return _STALE
        worker = int(answer[4:]) if answer.startswith("pid ") else None
        if worker is not None:
            conn.sendall(b"go\n")
    except (OSError, ValueError) as exc:
        _log().debug("the ocixfs service did not answer (%s); mounting in this process", exc)
        return None
    finally:
        for fd in fds[3:]:
            os.close(fd)
    if worker is None:
        _log().debug("the ocixfs service declined (%s); mounting in this process", answer)
        return None
    return _wait_for_worker(conn, worker)


def _wait_for_worker(conn: socket.socket, worker: int) -> int:
    """The worker's exit status; signals meant for us go to it meanwhile."""
    conn.settimeout(None)
    with _ForwardingSignals(worker) as signals:
        try:
            line = read_line(conn).decode(errors="replace").strip()
        except OSError:
            line = ""
    if line.startswith("status ") and line[7:].lstrip("-").isdigit():
        return int(line[7:])
    if signals.forwarded:
        return 128 + signals.forwarded[-1]
    print(f"ocixfs: the ocixfs service's worker {worker} died (see "
          f"{service_paths().log})", file=sys.stderr)
    return 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stdio_and_cwd() -> list[int]:
    """The caller's stdin, stdout, stderr (``/dev/null`` for a closed one) and a
    descriptor of its working directory, to hand to the worker."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    fds.append(os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    return fds


class _ForwardingSignals:
    """While inside: Ctrl-C (and SIGTERM, SIGHUP) reach the worker ``pid`` as if it were
    us; ``forwarded`` lists what was sent."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.forwarded: list[int] = []
        self._previous: dict[int, Any] = {}

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.forwarded.append(signum)
        try:  # noqa: SIM105 (no contextlib here: see the module docstring)
            os.kill(self.pid, signum)
        except OSError:
            pass  # gone already

    def __enter__(self) -> _ForwardingSignals:
        self._previous = {signum: signal.signal(signum, self._forward) for signum in self.CAUGHT}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def read_line(conn: socket.socket) -> bytes:
    """Bytes up to and including the first newline (or the end of the stream)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
