"""Processes the benchmark starts, and how it gets rid of them again.

Every server and FUSE daemon is a context manager: leaving the ``with`` block (normally, on an
exception, or on Ctrl-C) stops it and unmounts what it mounted. Servers run in their own
session so a terminal's Ctrl-C reaches only the harness, which then tears down in order
(mounts before the servers behind them). Everything listens on 127.0.0.1 only, and every
wait has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "Nginx",
    "Registry",
    "drop_caches",
    "free_port",
    "is_mounted",
    "nginx",
    "registry",
    "run_logged",
    "scratch_fs",
    "started",
    "unmount",
    "wait_until",
]

LOOPBACK = "127.0.0.1"
START_DEADLINE = 30.0
STOP_DEADLINE = 5.0
POLL = 0.005


def wait_until(
    condition: Callable[[], bool],
    deadline: float,
    what: str,
    *,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Poll condition until true; raise if the deadline passes or alive() turns false."""
    end = time.monotonic() + deadline
    while not condition():
        if not alive():
            raise RuntimeError(f"{what}: process exited")
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not ready after {deadline:.0f} s")
        time.sleep(POLL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((LOOPBACK, port)) == 0


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process we started (its whole session), escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_DEADLINE)


@contextlib.contextmanager
def started(
    argv: Sequence[str | os.PathLike[str]], log: Path, *, stop_signal: int = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """Start argv in its own session with output to log; stop it on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _stop(proc, stop_signal)


def run_logged(
    argv: Sequence[str | os.PathLike[str]],
    log: Path,
    *,
    timeout: float,
    env: dict[str, str] | None = None,
) -> None:
    """Run a command with its output appended to log; raise with the output's tail on failure."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(os.fspath(a) for a in argv)}\n".encode())
        out.flush()
        start = out.tell()
        proc = subprocess.run(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=env,
            check=False,
        )
    if proc.returncode != 0:
        with log.open("rb") as f:
            f.seek(start)
            tail = f.read().decode(errors="replace").strip().splitlines()[-8:]
        raise RuntimeError(
            f"{os.path.basename(os.fspath(argv[0]))} {os.fspath(argv[1]) if len(argv) > 1 else ''}"
            f" exited {proc.returncode}: " + " | ".join(tail)
        )


# -- nginx -----------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user root;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {run}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {run}/tmp-body;
    proxy_temp_path {run}/tmp-proxy;
    fastcgi_temp_path {run}/tmp-fastcgi;
    uwsgi_temp_path {run}/tmp-uwsgi;
    scgi_temp_path {run}/tmp-scgi;
    server {{
        listen {host}:{port};
        root {root};
        gzip_static on;  # a manifest with NAME.gz beside it goes out compressed
{locations}
    }}
}}
"""


PLAIN = "        location / { }"
# What the README tells a publisher to send: immutable blobs and packs; manifests, profiles
# and ocix-store.json current for a minute, 404s included.
PUBLISHER_HEADERS = """\
        location ~ /(blobs/blake3|packs)/[0-9a-f]+[^/]*$ {
            add_header Cache-Control "public, max-age=31536000, immutable";
        }
        location / { add_header Cache-Control "public, max-age=60" always; }"""


class Nginx:
    """A static file server on loopback; requests() counts access-log lines."""

    def __init__(self, port: int, run_dir: Path) -> None:
        self.port = port
        self.access_log = run_dir / "access.log"

    def requests(self) -> int:
        try:
            with self.access_log.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0


@contextlib.contextmanager
def nginx(root: Path, run_dir: Path, *, publisher_headers: bool = False) -> Iterator[Nginx]:
    """Serve root read-only over HTTP on a free loopback port (with ``publisher_headers``,
    the ``Cache-Control`` headers the README advises)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = run_dir / "nginx.conf"
    locations = PUBLISHER_HEADERS if publisher_headers else PLAIN
    conf.write_text(NGINX_CONF.format(run=run_dir, host=LOOPBACK, port=port, root=root,
                                      locations=locations))
    argv: list[str | Path] = ["nginx", "-c", conf, "-p", run_dir, "-e", run_dir / "error.log"]
    with started(argv, run_dir / "nginx.out", stop_signal=signal.SIGQUIT) as proc:
        wait_until(
            lambda: _accepts(port), START_DEADLINE, "nginx", alive=lambda: proc.poll() is None
        )
        yield Nginx(port, run_dir)


# -- docker-registry -------------------------------------------------------------------------

REGISTRY_CONF = """\
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {host}:{port}
"""


class Registry:
    """Debian's docker-registry (distribution 2.8); requests() counts its access-log lines."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log

    def requests(self) -> int:
        with self.log.open("rb") as f:
            return sum(1 for line in f if b'msg="response completed"' in line)


def _registry_up(port: int) -> bool:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def registry(storage: Path, run_dir: Path) -> Iterator[Registry]:
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = run_dir / "registry.yml"
    conf.write_text(REGISTRY_CONF.format(storage=storage, host=LOOPBACK, port=port))
    log = run_dir / "registry.log"
    with started(["docker-registry", "serve", conf], log) as proc:
        wait_until(
            lambda: _registry_up(port),
            START_DEADLINE,
            "docker-registry",
            alive=lambda: proc.poll() is None,
        )
        yield Registry(port, log)


# -- mounts and caches -----------------------------------------------------------------------


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def is_mounted(path: Path) -> bool:
    """Whether path (absolute, symlink-free) is a mount point. Never touches path itself:
    a FUSE daemon that is still starting would hang on it."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def unmount(path: Path, log: Path) -> None:
    """Unmount path if mounted: plainly first, lazily if that fails."""
    attempts: list[list[str | Path]] = [["umount", path], ["umount", "-l", path]]
    for argv in attempts:
        if not is_mounted(path):
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            run_logged(argv, log, timeout=STOP_DEADLINE)
    if is_mounted(path):
        raise RuntimeError(f"could not unmount {path}")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path, deepest first."""
    base = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    inside = [p for p in points if p == base or p.startswith(base + "/")]
    return [Path(p) for p in sorted(set(inside), key=len, reverse=True)]


@contextlib.contextmanager
def scratch_fs(backing: Path, mountpoint: Path, size_gb: int, log: Path) -> Iterator[Path]:
    """A fresh ext4 file system on a loop device, mounted at mountpoint for the benchmark.

    This host's root file system is mounted with ``discard``: deleting an unpacked image
    there takes minutes. Pulls, unpacks, caches and mounts of every run live here instead,
    on a real ext4 (so fsync and unpacking cost what they cost on a disk) where deleting is
    cheap. Mounts left behind by an interrupted run are removed first.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    for stale in mounts_under(mountpoint):
        unmount(stale, log)
    backing.parent.mkdir(parents=True, exist_ok=True)
    with backing.open("ab") as f:
        f.truncate(size_gb * 2**30)
    run_logged(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", backing], log, timeout=300)
    mountpoint.mkdir(parents=True, exist_ok=True)
    run_logged(["mount", "-o", "loop,nodiscard", backing, mountpoint], log, timeout=60)
    try:
        yield mountpoint
    finally:
        for inner in mounts_under(mountpoint):
            unmount(inner, log)
