"""The resident host service: one process per host that has imported everything a mount
needs, and runs each ``ocixfs mount`` of root in a child forked from that state.

Why: a fresh ``ocixfs mount`` spends most of its time importing trio, httpx and pyfuse3
and making a TLS context. The service pays that once; a mount through it costs a fork.

The protocol, on a Unix stream socket (``service.sock`` in the private runtime directory,
mode 0600; ``OCIXFS_SERVICE_DIR`` names another directory)::

    client ── {"op": "mount", "argv", "env", "umask", "identity", "code"}\\n
              + fds 0,1,2,cwd ──▶
    service ── accept, SO_PEERCRED is root ── fork ──▶ child ("the worker")
    client ◀── "pid N\\n" (or "refused REASON\\n": the client mounts in-process) ── worker
    client ── "go\\n" ──▶ worker: the caller's fds, cwd, environment and umask; then the
                         ordinary ``ocixfs mount`` code (``run_command``), which forks the
                         FUSE daemon and waits until it serves
    client ◀── "status N\\n" ── worker exits; the client exits with N

Other requests: ``{"op": "status"}``, ``{"op": "stop"}`` (one JSON line back), and
``GET /metrics`` (HTTP/1.0, the Prometheus text of ``mount.metrics``), also on an opt-in
TCP port. The service's loop is single-threaded and never blocks on a client: every
connection is handled by a child of its own, so the service never runs trio or a thread
when it forks. The FUSE daemons are the workers' children and outlive them (and the
service): killing the service leaves every mount serving; killing a daemon loses only its
mount. Starting: the first ``mount_through_service`` that finds no service binds the
socket (under ``service.lock``, so two first mounts start one service) and starts
``ocixfs service run`` on it in a new session, logging to ``service.log`` (not on a host
run by systemd: there the service is a unit, ``systemd/ocixfs.socket``). A service whose
modules are older than the installed files (``code_version``) is stopped and started anew.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ocixfs.errors import OcixError
from ocixfs.mount.runtime import runtime_dir
from ocixfs.safefs import private_directory

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any

__all__ = [
    "BYPASS_ENV",
    "SERVICE_DIR_ENV",
    "SOCKET_NAME",
    "ServicePaths",
    "ask_service",
    "connect",
    "mount_through_service",
    "run_service",
    "service_paths",
    "stop_service",
]

def _log() -> logging.Logger:
    """This module's logger; ``logging`` is imported only when something is said (the
    client, which is every root ``ocixfs mount``, imports as little as it can)."""
    import logging

    return logging.getLogger(__name__)


SERVICE_DIR_ENV = "OCIXFS_SERVICE_DIR"
SOCKET_NAME = "service.sock"
BYPASS_ENV = "OCIXFS_NO_SERVICE"
SOCKET_MODE = 0o600
HANDSHAKE_TIMEOUT = 10.0   # a running service forks a worker in milliseconds
START_TIMEOUT = 60.0       # a service just started imports first (cold disk: seconds)
REQUEST_TIMEOUT = 10.0     # how long a worker waits for a client's request or its "go"
MAX_REQUEST = 1 << 20
STOP_WAIT = 10.0
STALE_CODE = "stale code"
_STALE = -1  # not an exit status: _delegate's "start the service anew"
SYSTEMD_BOOTED = "/run/systemd/system"
_CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_in_worker = False  # True in a child of the service: its mounts never ask the service


class ServiceError(OcixError):
    """The service's socket or directory is not what it must be (one line for the user)."""


class ServicePaths:
    """Where the service lives: its socket, the lock taken to start it, its log. (Not a
    dataclass: the client imports as little as it can.)"""

    __slots__ = ("directory",)

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def socket(self) -> Path:
        return self.directory / SOCKET_NAME

    @property
    def lock(self) -> Path:
        return self.directory / "service.lock"

    @property
    def log(self) -> Path:
        return self.directory / "service.log"


def service_paths(*, create: bool = False) -> ServicePaths:
    """The service's directory: ``$OCIXFS_SERVICE_DIR``, else the runtime directory
    (``/run/ocixfs`` for root), checked private whenever it exists (``UnsafePathError``)."""
    given = os.environ.get(SERVICE_DIR_ENV)
    if not given:
        return ServicePaths(runtime_dir(create=create))
    if create or os.path.lexists(given):
        return ServicePaths(private_directory(given, what="service directory"))
    return ServicePaths(Path(given))


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
    conn = _try_connect(paths.socket)
    if conn is not None or not start:
        return conn
    with _locked(paths.lock):
        conn = _try_connect(paths.socket)  # another first mount may have started it
        if conn is None:
            _start_service(paths)
            conn = _try_connect(paths.socket)
    if conn is not None:
        conn.settimeout(START_TIMEOUT)
    return conn


def ask_service(conn: socket.socket, op: str, **args: str) -> dict[str, Any]:
    """One ``status``/``stop`` request on ``conn``; its JSON answer."""
    conn.settimeout(HANDSHAKE_TIMEOUT)
    conn.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
    answer: dict[str, Any] = json.loads(_read_line(conn) or b"{}")
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


def _try_connect(path: Path) -> socket.socket | None:
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
        conn.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None  # gone, or stale: nobody listens
    except OSError as exc:
        conn.close()
        raise ServiceError(f"service socket {path}: {exc.strerror or exc}") from None
    return conn


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def bind(path: Path) -> socket.socket:
    """A listening socket at ``path`` (a stale one replaced), mode 0600. The caller holds
    the lock, and the directory is private, so nobody can reach it meanwhile."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        path.unlink(missing_ok=True)
        sock.bind(os.fspath(path))
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
        answer = _read_line(conn).decode(errors="replace").strip()
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
    forwarded: list[int] = []
    with _forwarding_signals(worker, forwarded):
        try:
            line = _read_line(conn).decode(errors="replace").strip()
        except OSError:
            line = ""
    if line.startswith("status ") and line[7:].lstrip("-").isdigit():
        return int(line[7:])
    if forwarded:
        return 128 + forwarded[-1]
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


@contextlib.contextmanager
def _forwarding_signals(pid: int, forwarded: list[int]) -> Iterator[None]:
    """While the worker runs: Ctrl-C (and SIGTERM, SIGHUP) reach it as if it were us."""
    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        with contextlib.suppress(OSError):
            os.kill(pid, signum)

    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _read_line(conn: socket.socket) -> bytes:
    """Bytes up to and including the first newline (or the end of the stream)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# ----------------------------------------------------------------------------------------
# The service


class _State:
    """The service's loop: its listeners (fileno → socket, "unix" | "tcp"), what its
    workers run, and the children it has not reaped yet."""

    def __init__(self, listeners: dict[int, tuple[socket.socket, str]],
                 run_command: Callable[[list[str]], int],
                 metrics: Callable[[dict[str, Any]], str]) -> None:
        self.listeners = listeners
        self.run_command = run_command
        self.metrics = metrics
        self.started = time.time()
        self.code = code_version()
        self.children: set[int] = set()
        self.stopping = False


def run_service(
    run_command: Callable[[list[str]], int],
    metrics: Callable[[dict[str, Any]], str],
    *,
    listen_fd: int | None = None,
    metrics_listen: tuple[str, int] | None = None,
    ready: Callable[[], None] = lambda: None,
) -> int:
    """Serve until SIGTERM, SIGINT or a ``stop`` request. The socket is ``listen_fd``
    (bound by the client that started us), systemd's (``LISTEN_FDS``), or bound here;
    ``metrics_listen`` adds a TCP port for ``GET /metrics``. ``run_command(argv)`` runs
    in a worker; ``metrics(service_status)`` renders the Prometheus text. The socket file
    is removed at the end unless systemd owns it."""
    paths = service_paths(create=True)
    sock, owned = _listening_socket(paths, listen_fd)
    bound = os.stat(paths.socket).st_ino if owned else None
    listeners = {sock.fileno(): (sock, "unix")}
    if metrics_listen is not None:
        tcp = socket.create_server(metrics_listen, reuse_port=False)
        listeners[tcp.fileno()] = (tcp, "tcp")
    state = _State(listeners, run_command, metrics)
    service_pid = os.getpid()
    try:
        _log().info("service %d listening on %s", service_pid, paths.socket)
        ready()
        _loop(state)
    finally:
        if os.getpid() == service_pid:
            for listener, _kind in listeners.values():
                listener.close()
            with contextlib.suppress(OSError):
                if bound is not None and os.stat(paths.socket).st_ino == bound:
                    paths.socket.unlink()
    _log().info("service %d stopped (%d workers still running on their own)",
             service_pid, len(state.children))
    return 0


def _listening_socket(paths: ServicePaths, listen_fd: int | None) -> tuple[socket.socket, bool]:
    """The Unix socket to accept on, and whether it is ours to remove at the end."""
    if listen_fd is not None:
        return socket.socket(fileno=listen_fd), True
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return socket.socket(fileno=3), False  # systemd's (SD_LISTEN_FDS_START)
    with _locked(paths.lock):
        conn = _try_connect(paths.socket)
        if conn is not None:
            with conn:
                pid = ask_service(conn, "status").get("pid")
            raise ServiceError(f"the ocixfs service already runs (pid {pid}) on {paths.socket}")
        return bind(paths.socket), True


def _loop(state: _State) -> None:
    import selectors

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(wake_w)

    def stop(_signum: int, _frame: object) -> None:
        state.stopping = True

    handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # wakes select
    try:
        with selectors.DefaultSelector() as selector:
            for fileno in state.listeners:
                selector.register(fileno, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            private = (wake_r, wake_w, selector.fileno())
            while not state.stopping:
                for key, _ in selector.select(timeout=5.0):
                    if key.fd == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                    else:
                        _accept(state, key.fd, private)
                _reap(state)
    finally:
        signal.set_wakeup_fd(previous)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)


def _accept(state: _State, fileno: int, private: tuple[int, ...]) -> None:
    listener, kind = state.listeners[fileno]
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return
    with conn:
        if kind == "unix" and not _peer_allowed(conn):
            with contextlib.suppress(OSError):
                conn.sendall(b"refused the ocixfs service serves root only\n")
            return
        pid = os.fork()
        if pid == 0:
            os._exit(_child(state, conn, kind, private))
        state.children.add(pid)


def _peer_allowed(conn: socket.socket) -> bool:
    _pid, uid, _gid = _peer(conn)
    return uid in (0, os.geteuid())


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _reap(state: _State) -> None:
    for pid in list(state.children):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
        state.children.discard(pid)


def _child(state: _State, conn: socket.socket, kind: str, private: tuple[int, ...]) -> int:
    """A connection's own process: nothing of the service's loop survives in it."""
    global _in_worker
    _in_worker = True
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for listener, _kind in state.listeners.values():
        listener.close()
    for fd in private:
        os.close(fd)
    try:
        conn.settimeout(REQUEST_TIMEOUT)
        data, fds = _receive(conn) if kind == "unix" else (_read_line(conn), [])
        if data.startswith((b"GET ", b"HEAD ")):
            _answer_http(conn, data, state)
            return 0
        if kind != "unix":
            return 1  # the TCP port serves metrics, nothing else
        return _dispatch(state, conn, json.loads(data), fds)
    except Exception as exc:
        _log().warning("service request failed: %s: %s", type(exc).__name__, exc)
        return 1


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One request line and the descriptors that came with it."""
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 8)
    while data and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        more = conn.recv(MAX_REQUEST)
        if not more:
            break
        data += more
    return data, list(fds)


def _status(state: _State) -> dict[str, Any]:
    return {"pid": os.getppid(), "started": state.started, "identity": identity(),
            "workers": len(state.children)}


def _dispatch(state: _State, conn: socket.socket, request: dict[str, Any],
              fds: list[int]) -> int:
    op = request.get("op")
    if op == "mount":
        return _worker(state, conn, request, fds)
    if op == "status":
        conn.sendall(json.dumps(_status(state)).encode() + b"\n")
    elif op == "stop":
        conn.sendall(json.dumps(_status(state)).encode() + b"\n")
        if request.get("unless_code") != state.code:
            os.kill(os.getppid(), signal.SIGTERM)
    else:
        conn.sendall(json.dumps({"error": f"unknown request {op!r}"}).encode() + b"\n")
    return 0


def _answer_http(conn: socket.socket, head: bytes, state: _State) -> None:
    """``GET /metrics``: the Prometheus text; anything else: 404."""
    while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < 16384:
        more = conn.recv(16384)
        if not more:
            break
        head += more
    target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
    if target.split(b"?")[0] == b"/metrics":
        body = state.metrics(_status(state)).encode()
        status, kind = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
    else:
        body, status, kind = b"not found: try /metrics\n", "404 Not Found", "text/plain"
    header = (f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    conn.sendall(header + (b"" if head.startswith(b"HEAD ") else body))


def _worker(state: _State, conn: socket.socket, request: dict[str, Any],
            fds: list[int]) -> int:
    """Run one ``ocixfs mount`` for the client as if it were the client."""
    refusal = _refusal(state, conn, request, fds)
    if refusal:
        conn.sendall(f"refused {refusal}\n".encode())
        return 0
    conn.sendall(f"pid {os.getpid()}\n".encode())
    if _read_line(conn).strip() != b"go":
        return 0  # the client gave up (it mounts in its own process)
    _become_caller(request, fds)
    os.register_at_fork(after_in_child=conn.close)  # the FUSE daemon must not hold it
    status = _run(state.run_command, [str(arg) for arg in request["argv"]])
    with contextlib.suppress(OSError):
        conn.sendall(f"status {status}\n".encode())
    return 0


def _refusal(state: _State, conn: socket.socket, request: dict[str, Any],
             fds: list[int]) -> str:
    """Why this worker must not run the client's mount ("" if it may): another ocixfs,
    or a client in another mount namespace or root directory (the mount would land in
    ours, not where the caller sees it)."""
    if request.get("identity") != identity():
        return "another ocixfs installation"
    if request.get("code") != state.code:
        return f"{STALE_CODE}: ocixfs changed since the service started"
    if len(fds) != 4 or not isinstance(request.get("argv"), list):
        return "malformed request"
    pid, _uid, _gid = _peer(conn)
    try:
        theirs = [os.stat(f"/proc/{pid}/ns/mnt"), os.stat(f"/proc/{pid}/root")]
        ours = [os.stat("/proc/self/ns/mnt"), os.stat("/")]
    except OSError:
        return "client not visible"
    if any((a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) for a, b in zip(theirs, ours, strict=True)):
        return "client in another mount namespace or root"
    return ""


def _become_caller(request: dict[str, Any], fds: list[int]) -> None:
    """The client's stdin/stdout/stderr, working directory, environment and umask, and
    logging set up afresh (to the new stderr, as the command will configure it)."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.fchdir(fds[3])
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    os.umask(int(request["umask"]))
    sys.stdin = open(0, closefd=False, errors="surrogateescape")  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False, errors="surrogateescape",  # noqa: SIM115
                      buffering=1 if os.isatty(1) else -1)
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace", buffering=1)  # noqa: SIM115
    import logging

    logging.getLogger("ocixfs").handlers.clear()


def _run(run_command: Callable[[list[str]], int], argv: list[str]) -> int:
    """The command's exit status, as the ``ocixfs`` process would have exited with."""
    import traceback

    try:
        status = run_command(argv)
    except SystemExit as exc:  # argparse: usage errors and --help
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status


def parse_listen(text: str) -> tuple[str, int]:
    """``[HOST]:PORT`` for ``--metrics-listen`` (no host: 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise OcixError(f"--metrics-listen {text}: not [HOST]:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)

