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
The client half is ``mount.serviceclient``, which imports next to nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

from ocixfs.errors import OcixError
from ocixfs.mount.serviceclient import (
    MAX_REQUEST,
    STALE_CODE,
    ServiceError,
    ServicePaths,
    ask_service,
    bind,
    code_version,
    enter_worker,
    identity,
    locked,
    read_line,
    service_paths,
    try_connect,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["parse_listen", "run_service"]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # how long a worker waits for a client's request or its "go"


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
        log.info("service %d listening on %s", service_pid, paths.socket)
        ready()
        _loop(state)
    finally:
        if os.getpid() == service_pid:
            for listener, _kind in listeners.values():
                listener.close()
            with contextlib.suppress(OSError):
                if bound is not None and os.stat(paths.socket).st_ino == bound:
                    os.unlink(paths.socket)
    log.info("service %d stopped (%d workers still running on their own)",
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
    with locked(paths.lock):
        conn = try_connect(paths.socket)
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
    enter_worker()
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
        data, fds = _receive(conn) if kind == "unix" else (read_line(conn), [])
        if data.startswith((b"GET ", b"HEAD ")):
            _answer_http(conn, data, state)
            return 0
        if kind != "unix":
            return 1  # the TCP port serves metrics, nothing else
        return _dispatch(state, conn, json.loads(data), fds)
    except Exception as exc:
        log.warning("service request failed: %s: %s", type(exc).__name__, exc)
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
    if read_line(conn).strip() != b"go":
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

