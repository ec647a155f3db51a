"""The attacker tier: another user of the host attacks ocixfs for real.

Each test runs ocixfs as root (or as an ordinary user) while a second, unprivileged user
plants symlinks, swaps directories mid-run and connects to sockets, in a forked process
that has really dropped its privileges (``os.setuid``). The tests need root; they leave
nothing behind on the host (the users are bare uids with no passwd entry).

Fixtures and helpers:

- ``arena``: a fresh directory under ``/tmp`` (root, 0755) that every user can reach
  (``tmp_path`` is private to root); removed at teardown.
- ``attacker``: the hostile user; ``user``: an ordinary user, for the runs of ocixfs that
  are not root's. Both are ``User``s: ``run(fn, *args)`` calls ``fn`` as that user in a
  forked child and returns its result; ``start(fn, *args)`` runs ``fn(ready, *args)``
  in the background once it called ``ready()`` (a ``Racer``: ``result()`` joins it).
- ``Inotify``: a minimal inotify(7) reader, so that an attacker reacts to what root does
  the instant it happens instead of guessing with sleeps.
- ``ocixfs(*args, as_user=None)``: the real command line in a subprocess.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attacks need root and a second user")

ATTACKER_UID = 61001
USER_UID = 61002
REPO = Path(__file__).resolve().parents[2]

IN_OPEN = 0x20
IN_CREATE = 0x100
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


@dataclass(frozen=True)
class User:
    """An unprivileged user (uid = gid, no supplementary groups)."""

    uid: int

    def drop_privileges(self) -> None:
        os.setgroups([])
        os.setgid(self.uid)
        os.setuid(self.uid)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
        """``fn(*args)`` as this user in a forked child; its return value, or its
        exception re-raised here as an ``AssertionError`` with the child's traceback."""
        racer = self._spawn(fn, args, ready=False)
        return racer.result(timeout)

    def start(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Racer:
        """Start ``fn(ready, *args)`` as this user; return once it called ``ready()``."""
        racer = self._spawn(fn, args, ready=True)
        if not racer.ready.wait(timeout):
            racer.kill()
            raise AssertionError(f"{fn.__name__} did not get ready")
        return racer

    def _spawn(self, fn: Callable[..., Any], args: tuple[Any, ...], *, ready: bool) -> Racer:
        context = multiprocessing.get_context("fork")
        event = context.Event()
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(self, fn, args, event if ready else None,
                                                       send))
        process.start()
        send.close()
        return Racer(process, event, receive)


def _child(user: User, fn: Callable[..., Any], args: tuple[Any, ...],
           ready: Any, send: Connection) -> None:
    try:
        user.drop_privileges()
        result = fn(ready.set, *args) if ready is not None else fn(*args)
        send.send(("ok", result))
    except BaseException:
        send.send(("error", traceback.format_exc()))


@dataclass
class Racer:
    """A background attack started by ``User.start``."""

    process: Any
    ready: Any
    receive: Connection

    def result(self, timeout: float = 60) -> Any:
        if not self.receive.poll(timeout):
            self.kill()
            raise AssertionError(f"the attacker's process did not finish in {timeout} s")
        status, value = self.receive.recv()
        self.process.join(10)
        if status != "ok":
            raise AssertionError(f"the attacker's process failed:\n{value}")
        return value

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)


class Inotify:
    """inotify(7) through libc: ``add(path, mask)``, then ``events(timeout)`` yields
    ``(watched path, mask, name)`` as they come."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._paths: dict[int, str] = {}

    def add(self, path: str | Path, mask: int) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self._paths[wd] = os.fspath(path)

    def events(self, timeout: float) -> Iterator[tuple[str, int, str]]:
        import select
        import time

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset:offset + length].rstrip(b"\0").decode()
                offset += length
                yield self._paths.get(wd, ""), mask, name

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def arena() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ocixfs-attack-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def attacker() -> User:
    return User(ATTACKER_UID)


@pytest.fixture
def user() -> User:
    return User(USER_UID)


def owned_dir(path: Path, owner: User, mode: int = 0o755) -> Path:
    """``path`` made as a directory of ``owner``."""
    path.mkdir(parents=True)
    os.chown(path, owner.uid, owner.uid)
    os.chmod(path, mode)
    return path


def ocixfs(*args: str, as_user: User | None = None, timeout: float = 120,
           umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """The ``ocixfs`` command of this checkout, as root in a subprocess, or as
    ``as_user`` in a forked child that calls its ``main()`` (an unprivileged user may not
    execute this interpreter, which lives under /root; every ocixfs module is imported
    before the fork, so the child reads no file of the checkout)."""
    if as_user is not None:
        return _main_as(as_user, args, timeout)

    def prepare() -> None:
        if umask is not None:
            os.umask(umask)

    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run([sys.executable, "-m", "ocixfs", *args], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=prepare, env=env, cwd="/")


def _main_as(user: User, args: tuple[str, ...], timeout: float
             ) -> subprocess.CompletedProcess[str]:
    import importlib
    import io
    import logging
    import pkgutil

    import ocixfs as package

    for module in pkgutil.walk_packages(package.__path__, "ocixfs."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:

        def call() -> int:
            from ocixfs.cli import main

            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.chdir("/")
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "wb", closefd=False), write_through=True)
            logging.getLogger().handlers.clear()
            logging.getLogger("ocixfs").handlers.clear()
            status: int = main(list(args))
            return status

        status = user.run(call, timeout=timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["ocixfs", *args], status,
                                           out.read().decode(), err.read().decode())


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The command failed with a single ``ocixfs: …`` line naming ``fragments``."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocixfs: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr


def build_image(arena: Path, files: dict[str, bytes], *, name: str = "image") -> Path:
    """An image of ``files`` (relative path → content; directories 0755) built by the real
    ``ocixfs build`` into ``arena/store``, readable by every user. Returns the manifest."""
    source = arena / f"{name}-src"
    for relative, data in files.items():
        target = source / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    image = arena / f"{name}.ocix"
    result = ocixfs("build", f"dir:{source}", "--store", os.fspath(arena / "store"),
                    "-o", os.fspath(image), "--no-progress")
    assert result.returncode == 0, result.stderr
    for directory, _, names in os.walk(arena / "store"):
        os.chmod(directory, 0o755)
        for entry in names:
            os.chmod(os.path.join(directory, entry), 0o644)
    os.chmod(image, 0o644)
    return image
