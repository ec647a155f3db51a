"""A newcomer's rough edges of the ``ocixfs`` command (issue 11), each checked by running
the real command: real mounts, real servers, a real unprivileged user, real pipes.
"""

from __future__ import annotations

import importlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocixfs.mount.control import mount_id
from ocixfs.mount.profile import Profile, encode_profile
from tests.mounting import OCIXFS, Mount, Mounts, is_mounted, needs_fuse, run_ocixfs
from tests.reliabilitykit import Image, mount_args, write_image
from tests.servers import FaultServers

FILES = {"/etc/hostname": b"polish\n", "/data/a.bin": os.urandom(50_000)}

# What ``ocixfs mount`` imports on its way, imported before a child drops to ``nobody``:
# the interpreter's own library may be unreadable to that user (a pyenv under /root).
MOUNT_MODULES = (
    "concurrent.futures", "select", "tempfile", "ocixfs.cli", "ocixfs.cli.mount",
    "ocixfs.mount.daemon", "ocixfs.mount.session", "ocixfs.mount.fs", "ocixfs.mount.control",
    "ocixfs.fetch.reader", "ocixfs.store.remote", "ocixfs.store.spec", "ocixfs.image.loading",
    "ocixfs.image.tree", "ocixfs.mount.profile", "ocixfs.cache.sizes", "ocixfs.log",
)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return write_image(tmp_path / "image", FILES)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can read (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ocixfs-polish-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(args: list[str], env: dict[str, str], output: Path) -> int:
    """``ocixfs ARGS`` run in a forked child as ``nobody`` (stdout and stderr to
    ``output``); its exit status."""
    nobody = pwd.getpwnam("nobody")
    for name in MOUNT_MODULES:
        importlib.import_module(name)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 99
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 -- pytest's are captures
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            logging.getLogger("ocixfs").handlers.clear()  # main() sets it up again
            os.environ.update(env)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            from ocixfs.cli import main

            status = main(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_fuse
@pytest.mark.mount
def test_a_mount_that_the_kernel_refuses_is_one_line_and_leaves_nothing(
    shared_dir: Path,
) -> None:
    """``nobody`` mounting (``/dev/fuse`` is root's here, or, where it is open to all, a
    root-owned mountpoint makes fusermount3 refuse): one line, exit 1, no socket, no log,
    no mount. It used to print ``ExceptionGroup: Exceptions from Trio nursery`` and leave
    the control socket behind."""
    image = write_image(shared_dir / "image", FILES)
    for path in shared_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    mountpoint = shared_dir / "mnt"
    mountpoint.mkdir()  # root's: nobody may not mount on it
    runtime = shared_dir / "run"
    runtime.mkdir()
    os.chown(runtime, pwd.getpwnam("nobody").pw_uid, -1)
    env = {"XDG_RUNTIME_DIR": os.fspath(runtime), "XDG_CACHE_HOME": os.fspath(runtime / "c"),
           "HOME": os.fspath(runtime)}
    output = shared_dir / "output"
    status = run_as_nobody(
        ["mount", os.fspath(image.ocix), os.fspath(mountpoint), "--store", os.fspath(image.store),
         "--prefetch", "none"], env, output)
    said = output.read_text()
    assert status == 1, said
    assert said.startswith(f"ocixfs: {mountpoint}: cannot mount: ") and said.count("\n") == 1
    assert "Trio" not in said and "Traceback" not in said
    if os.stat("/dev/fuse").st_mode & 0o006 == 0:
        assert "/dev/fuse" in said
    sockets_and_logs = [path.name for path in (runtime / "ocixfs").glob(f"{mount_id(mountpoint)}*")]
    assert sockets_and_logs == [] and not is_mounted(mountpoint)


def test_version() -> None:
    from ocixfs import __version__

    assert run_ocixfs("--version").stdout == f"ocixfs {__version__}\n"
