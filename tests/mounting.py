"""Helpers for tests that need a real FUSE mount of the ``ocixfs`` console script.

The daemon runs as a subprocess exactly as a user would start it; teardown always
lazy-unmounts and then makes sure the process is gone, so a failing test never leaves a
mount behind. ``Mounts`` (the ``mounts`` fixture of ``tests/conftest.py``) makes a test's
``Mount``s and, at its end, stops any still mounted, even one whose ``start()`` failed
half-way (``with`` never stops those).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

OCIXFS = [sys.executable, "-m", "ocixfs"]


def fuse_available() -> bool:
    return (
        os.path.exists("/dev/fuse")
        and os.geteuid() == 0
        and shutil.which("fusermount3") is not None
    )


needs_fuse = pytest.mark.skipif(
    not fuse_available(), reason="needs root, /dev/fuse and fusermount3"
)


def run_ocixfs(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*OCIXFS, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"ocixfs {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def is_mounted(mountpoint: Path) -> bool:
    target = os.fsencode(mountpoint)
    with open("/proc/self/mounts", "rb") as mounts:
        return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def force_unmount(mountpoint: Path) -> None:
    """Lazy-unmount whatever is at ``mountpoint`` (teardown; never raises)."""
    for _ in range(3):
        if not is_mounted(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], capture_output=True)
        subprocess.run(["umount", "-l", os.fspath(mountpoint)], capture_output=True)


def store_args(stores: str | Sequence[str], cache: Path, *more: str) -> list[str]:
    """``--store URL`` for each store, ``--cache-dir cache``, then ``more``."""
    urls = [stores] if isinstance(stores, str) else list(stores)
    pairs = [arg for url in urls for arg in ("--store", url)]
    return [*pairs, "--cache-dir", os.fspath(cache), *more]


class Mount:
    """A background ``ocixfs mount`` started like a user would, torn down without fail."""

    def __init__(self, image: Path | str, mountpoint: Path, *args: str) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.args = args
        self.pid: int | None = None

    def start(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        result = run_ocixfs("mount", os.fspath(self.image), os.fspath(self.mountpoint), *self.args)
        assert is_mounted(self.mountpoint), result.stderr
        self.pid = int(str(self.stats()["pid"]))
        return self

    def stats(self) -> dict[str, object]:
        import json

        result = run_ocixfs("stats", os.fspath(self.mountpoint), "--json")
        data: dict[str, object] = json.loads(result.stdout)
        return data

    def stop(self) -> None:
        try:
            if is_mounted(self.mountpoint):
                run_ocixfs("umount", os.fspath(self.mountpoint), check=False, timeout=60)
        finally:
            force_unmount(self.mountpoint)
            if self.pid is not None:
                _kill_quietly(self.pid)

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Mounts:
    """``mounts(image, mountpoint, *args)`` makes a ``Mount`` (not started: ``with`` it);
    ``close()`` stops, with a lazy unmount, every one of them that is still mounted."""

    def __init__(self) -> None:
        self._made: list[Mount] = []

    def __call__(self, image: Path | str, mountpoint: Path, *args: str) -> Mount:
        mount = Mount(image, mountpoint, *args)
        self._made.append(mount)
        return mount

    def close(self) -> None:
        with contextlib.ExitStack() as stack:
            for mount in self._made:
                stack.callback(_stop_if_mounted, mount)


def _stop_if_mounted(mount: Mount) -> None:
    if is_mounted(mount.mountpoint):
        mount.stop()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
