"""The kernel keeps listings and symlink targets of a mounted image (``mount/kernelcache``).

A real mount of a real tree: after the first ``find``, listing every directory and reading
every symlink again must not reach the daemon (its READDIR and READLINK counters stay put)
and must give the same answers. When the ELF checks fail, nothing is changed: a small
pyfuse3 filesystem in a child process lists correctly with caching off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ocixfs.mount import kernelcache
from tests.mounting import run_ocixfs

pytestmark = [pytest.mark.mount]


def make_tree(root: Path) -> None:
    for d in range(30):
        directory = root / f"dir{d:02}"
        directory.mkdir(parents=True)
        for f in range(40):  # enough names that a listing takes several READDIRs
            (directory / f"file-with-a-long-name-{f:03}.txt").write_text(f"{d}/{f}\n")
        (directory / "link").symlink_to(f"file-with-a-long-name-{d:03}.txt")
    (root / "top-link").symlink_to("dir00/link")


def snapshot(root: Path) -> list[tuple[str, str]]:
    """Every path under root with its symlink target (or ``-``), in walk order."""
    seen: list[tuple[str, str]] = []
    for directory, names, files in os.walk(root):
        names.sort()
        for name in sorted(names + files):
            path = Path(directory, name)
            target = os.readlink(path) if path.is_symlink() else "-"
            seen.append((os.fspath(path.relative_to(root)), target))
    return seen


def test_second_walk_is_served_by_the_kernel(tmp_path: Path, mounts: object) -> None:
    tree, store = tmp_path / "tree", tmp_path / "store"
    make_tree(tree)
    image = tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{tree}", "--store", os.fspath(store), "--output", os.fspath(image))
    with mounts(image, tmp_path / "mnt", "--store", os.fspath(store),  # type: ignore[operator]
                "--cache-dir", os.fspath(tmp_path / "cache")) as mount:
        first = snapshot(mount.mountpoint)
        assert first == snapshot(tree)
        before = mount.stats()
        assert before["kernel_caching"] == {"listings": True, "symlinks": True}
        assert before["fs"]["listings"] >= 31 and before["fs"]["readlinks"] >= 31

        assert snapshot(mount.mountpoint) == first
        after = mount.stats()
        assert after["fs"]["listings"] == before["fs"]["listings"]
        assert after["fs"]["readlinks"] == before["fs"]["readlinks"]
        assert after["fs"]["errors"] == {}


CHILD = """
import errno, os, sys, trio, pyfuse3
from ocixfs.mount import kernelcache

kernelcache.enable(sys.argv[2])

class Flat(pyfuse3.Operations):
    names = [f"n{i:03}".encode() for i in range(200)]
    listings = 0

    async def getattr(self, inode, ctx=None):
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode
        attributes.st_mode = 0o40755 if inode == 1 else 0o100644
        attributes.attr_timeout = attributes.entry_timeout = 300
        return attributes

    async def opendir(self, inode, ctx):
        if kernelcache.listings_cached():
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return inode

    async def readdir(self, fh, start, token):
        assert fh == 1, fh
        self.listings += 1
        for index in range(start, len(self.names)):
            attributes = await self.getattr(index + 2)
            if not pyfuse3.readdir_reply(token, self.names[index], attributes, index + 1):
                return

    async def releasedir(self, fh):
        pass

operations = Flat()
pyfuse3.init(operations, sys.argv[1], set())

async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        first = await trio.to_thread.run_sync(os.listdir, sys.argv[1])
        after_first = operations.listings
        second = await trio.to_thread.run_sync(os.listdir, sys.argv[1])
        print(kernelcache.listings_cached(), after_first, operations.listings, first == second,
              sorted(first) == [n.decode() for n in Flat.names])
        pyfuse3.terminate()

trio.run(main)
pyfuse3.close()
"""


@pytest.mark.parametrize("extension", ["pyfuse3", "not-an-elf"])
def test_listings_are_right_with_caching_on_or_refused(tmp_path: Path, extension: str) -> None:
    import pyfuse3

    path = pyfuse3.__file__ if extension == "pyfuse3" else os.fspath(tmp_path / "fake.so")
    (tmp_path / "fake.so").write_bytes(b"#!/bin/sh\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run([sys.executable, "-c", CHILD, os.fspath(mnt), path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cached, after_first, after_second, same, complete = done.stdout.split()
    assert (same, complete) == ("True", "True")
    assert int(after_first) > 1  # 200 names do not fit one READDIR reply
    if extension == "pyfuse3":
        assert (cached, after_second) == ("True", after_first)
    else:
        assert (cached, int(after_second)) == ("False", 2 * int(after_first))


def test_elf_reader_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    for content in (b"", b"\x7fELF", b"\x7fELF\x01\x01" + bytes(100), os.urandom(4096)):
        with pytest.raises((ValueError, IndexError, kernelcache.struct.error)):
            image = kernelcache._ElfImage(content)
            image.jump_slot("fuse_session_new")
