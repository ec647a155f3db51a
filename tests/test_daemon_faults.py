"""Daemon faults (issue 5, item 4): the mount daemon is killed (SIGKILL, as the OOM killer
would) while processes read through it. What a user sees, and how it is recovered
without a reboot: ``ocixfs umount`` detaches the dead mount lazily and a fresh
``ocixfs mount`` serves the same mountpoint, from the same (still consistent) cache.

Measured behaviour of processes using the old mount (documented in the README, "Reliability"):
a read blocked in the daemon fails at once with ENOTCONN; opens, new lookups and reads of
content not in the page cache fail with ENOTCONN; what the kernel still caches (the
attributes of names already looked up, pages of open files already read) keeps being
served, even after the unmount, until those processes close their files.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from tests.faultserver import Fault, FaultServer
from tests.mounting import Mount, is_mounted, needs_fuse, process_alive, run_ocixfs, wait_for
from tests.reliabilitykit import mount_args, read_or_errno, write_image

pytestmark = [needs_fuse, pytest.mark.mount]

MiB = 1 << 20
FILES = {
    "/etc/hostname": b"survivor\n",
    "/data/big.bin": os.urandom(3 * MiB),
    "/data/slow.bin": os.urandom(100_000),
    "/data/never-read.bin": os.urandom(5_000),
}

# ENOTCONN once the connection is gone; ECONNABORTED for a request caught while the kernel
# tears it down
DEAD = {errno.ENOTCONN, errno.ECONNABORTED}

_BLOCKED_READER = """\
import os, sys
try:
    open(sys.argv[1], "rb").read()
except OSError as exc:
    sys.exit(exc.errno)
"""


def _errno_of(call: Callable[[], object]) -> int | None:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def test_killed_daemon_is_reported_then_recovered_by_umount_and_a_fresh_mount(
    tmp_path: Path,
) -> None:
    image = write_image(tmp_path / "image", FILES, chunk_size=MiB)
    cache = tmp_path / "cache"
    args = ["--cache-dir", os.fspath(cache), "--prefetch", "none"]
    with FaultServer(image.store) as server:
        server.fault(image.hexes("/data/slow.bin")[0], Fault(stall=600))
        first = Mount(image.ocix, tmp_path / "mnt", "--store", server.url, *args)
        second = Mount(image.ocix, tmp_path / "mnt", "--store", server.url, *args)
        with first:
            mnt = first.mountpoint
            assert (mnt / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
            held = (mnt / "data/big.bin").open("rb")
            assert held.read(64 * 1024) == FILES["/data/big.bin"][: 64 * 1024]
            blocked = subprocess.Popen(
                [sys.executable, "-c", _BLOCKED_READER, os.fspath(mnt / "data/slow.bin")]
            )
            try:
                wait_for(lambda: server.count(image.hexes("/data/slow.bin")[0]) > 0,
                         what="a read waiting in the daemon")
                assert first.pid is not None
                os.kill(first.pid, signal.SIGKILL)
                # the read that was waiting in the daemon fails at once
                assert blocked.wait(timeout=30) in DEAD
            finally:
                if blocked.poll() is None:
                    blocked.kill()
                    blocked.wait()
            wait_for(lambda: not process_alive(first.pid or 0), what="the daemon to die")

            # what users of the dead mount see
            assert is_mounted(mnt)
            assert _errno_of(lambda: os.stat(mnt / "data/never-read.bin")) in DEAD
            assert os.stat(mnt / "etc/hostname").st_size == 9  # attributes the kernel caches
            # the kernel opens files itself: pages it holds are still read, else the daemon
            # is needed and gone
            assert read_or_errno(mnt / "etc/hostname") in {FILES["/etc/hostname"], *DEAD}
            held.seek(2 * MiB)
            assert _errno_of(lambda: held.read(4096)) in DEAD  # not cached

            # a fresh mount refuses the dead mountpoint and says what to do
            refused = run_ocixfs("mount", os.fspath(image.ocix), os.fspath(mnt),
                                 "--store", server.url, *args, check=False)
            assert refused.returncode == 2 and refused.stderr.count("\n") == 1
            assert f"run 'ocixfs umount {mnt}' first" in refused.stderr

            # recovery, without touching the process that still holds a file open
            run_ocixfs("umount", os.fspath(mnt), timeout=60)
            assert not is_mounted(mnt)
            server.clear()
            with second:
                for path, content in FILES.items():
                    assert (mnt / path[1:]).read_bytes() == content
                held.seek(0)
                assert held.read(4096) == FILES["/data/big.bin"][:4096]  # old, cached pages
                held.seek(2 * MiB)
                assert _errno_of(lambda: held.read(4096)) in DEAD  # still the old mount
                held.close()
                assert second.stats()["pid"] == second.pid
    assert not is_mounted(tmp_path / "mnt")
    blobs = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(blake3.blake3(p.read_bytes()).hexdigest() == p.name for p in blobs)


def test_umount_of_a_dead_mount_without_open_files(tmp_path: Path) -> None:
    image = write_image(tmp_path / "image", FILES)
    mount = Mount(image.ocix, tmp_path / "mnt", *mount_args(
        image.store.as_uri(), tmp_path / "cache"))
    with mount:
        assert mount.pid is not None
        os.kill(mount.pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(mount.pid or 0), what="the daemon to die")
        assert _errno_of(lambda: os.listdir(mount.mountpoint / "data")) in DEAD
        run_ocixfs("umount", os.fspath(mount.mountpoint), timeout=60)
        assert not is_mounted(mount.mountpoint)
        assert os.listdir(mount.mountpoint) == []  # the plain directory again
        with mount:  # and the same command mounts it again
            assert (mount.mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
