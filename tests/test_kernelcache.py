"""The kernel keeps listings and symlink targets of a mounted image (``mount/kernelcache``).

A real mount of a real tree: after the first ``find``, listing every directory and reading
every symlink again must not reach the daemon (its READDIR and READLINK counters stay put)
and must give the same answers. When the ELF checks fail, nothing is changed: a small
pyfuse3 filesystem in a child process lists correctly with caching off.
"""

from __future__ import annotations

import errno
import os
import stat
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
        assert before["kernel_caching"] == {"listings": True, "symlinks": True,
                                            "metadata": False}
        assert before["fs"]["listings"] >= 31 and before["fs"]["readlinks"] >= 31

        assert snapshot(mount.mountpoint) == first
        after = mount.stats()
        assert after["fs"]["listings"] == before["fs"]["listings"]
        assert after["fs"]["readlinks"] == before["fs"]["readlinks"]
        assert after["fs"]["errors"] == {}


def make_varied_tree(root: Path) -> None:
    """Owners, modes, a hardlink pair, symlinks, a FIFO, and one directory whose listing
    takes several READDIRPLUS requests."""
    big = root / "big"
    big.mkdir(parents=True)
    for number in range(400):
        path = big / f"entry-with-a-longish-name-{number:04}"
        path.write_bytes(b"x" * number)
        os.chown(path, 1000 + number % 7, 2000 + number % 5)
        path.chmod(0o600 | (number % 8) * 0o010)
    special = root / "special"
    special.mkdir(mode=0o750)
    (special / "setuid").write_text("s\n")
    (special / "setuid").chmod(0o4755)
    (special / "sticky").mkdir()
    (special / "sticky").chmod(0o1777)
    (special / "linked").write_text("one inode, two names\n")
    os.link(special / "linked", special / "linked-too")
    (special / "to-setuid").symlink_to("setuid")
    (special / "dangling").symlink_to("../nowhere/at/all")
    os.mkfifo(special / "fifo", 0o640)
    os.utime(special / "setuid", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


def list_only(root: Path) -> list[str]:
    """Every path under root, sorted, found by listing alone (``d_type``, no ``stat``)."""
    found: list[str] = []
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                found.append(os.fspath(Path(entry.path).relative_to(root)))
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    return sorted(found)


def lstat_all(root: Path, paths: list[str]) -> dict[str, tuple[int, ...]]:
    """What ``find -ls`` shows of each path (relative to root), and the inode number."""
    found: dict[str, tuple[int, ...]] = {}
    for path in paths:
        info = os.lstat(root / path)
        found[path] = (info.st_ino, info.st_mode, info.st_nlink, info.st_uid, info.st_gid,
                       info.st_size, info.st_blocks, info.st_mtime_ns, info.st_rdev)
    return found


def test_stat_after_a_listing_is_what_a_lookup_gives(tmp_path: Path, mounts: object) -> None:
    """The attributes READDIRPLUS hands the kernel (every lstat after a listing is answered
    from them: no LOOKUP reaches the daemon) are exactly those a LOOKUP gives on a mount that
    never listed, and match the source tree, owner shift included."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    make_varied_tree(tree)
    image = tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{tree}", "--store", os.fspath(store), "--output", os.fspath(image))
    paths = sorted(os.fspath(path.relative_to(tree)) for path in tree.rglob("*"))
    options = ("--store", os.fspath(store), "--cache-dir", os.fspath(tmp_path / "cache"),
               "-o", "uidshift=100000,gidshift=200000", "--fuse-only")  # the FUSE path
    with mounts(image, tmp_path / "listed", *options) as listed:  # type: ignore[operator]
        before = listed.stats()["fs"]
        walked = list_only(listed.mountpoint)
        by_listing = lstat_all(listed.mountpoint, paths)
        after = listed.stats()["fs"]
    assert walked == paths
    assert after["lookups"] == before["lookups"]  # type: ignore[index]
    assert after["listings"] >= 4 and after["errors"] == {}  # type: ignore[index,operator]
    with mounts(image, tmp_path / "looked-up", *options) as looked_up:  # type: ignore[operator]
        by_lookup = lstat_all(looked_up.mountpoint, paths)
        assert looked_up.stats()["fs"]["listings"] == 0  # type: ignore[index]
    assert by_listing == by_lookup

    source = lstat_all(tree, paths)
    for path, (_, mode, nlink, uid, gid, size, _, mtime_ns, rdev) in source.items():
        ino, m_mode, m_nlink, m_uid, m_gid, m_size, m_blocks, m_mtime, m_rdev = by_listing[path]
        assert (m_mode, m_uid, m_gid, m_rdev) == (mode, uid + 100000, gid + 200000, rdev), path
        if not stat.S_ISDIR(mode):
            assert (m_nlink, m_size, m_mtime, m_blocks) == (
                nlink, size, mtime_ns, (size + 511) // 512), path
    assert by_listing["special/linked"][0] == by_listing["special/linked-too"][0]
    assert by_listing["special/linked"][2] == 2


def test_files_are_opened_by_the_kernel_and_read_by_inode(tmp_path: Path, mounts: object) -> None:
    """After the first OPEN (answered ENOSYS) no OPEN reaches the daemon; READ finds the
    file by its inode; every file reads right, each is counted as read once, reading it
    again through a new descriptor is served from the kept page cache, and opening one for
    writing is still refused."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    make_tree(tree)
    image = tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{tree}", "--store", os.fspath(store), "--output", os.fspath(image))
    files = sorted(path.relative_to(tree) for path in tree.rglob("*.txt"))
    with mounts(image, tmp_path / "mnt", "--store", os.fspath(store),  # type: ignore[operator]
                "--cache-dir", os.fspath(tmp_path / "cache")) as mount:
        for path in files:
            assert (mount.mountpoint / path).read_bytes() == (tree / path).read_bytes()
        first = mount.stats()["fs"]
        assert first["opens"] == 1 and first["open_files"] == 0, first
        assert first["files_read"] == len(files) and first["errors"] == {}, first
        for path in files:
            assert (mount.mountpoint / path).read_bytes() == (tree / path).read_bytes()
        again = mount.stats()["fs"]
        assert (again["opens"], again["reads"]) == (1, first["reads"]), again
        with pytest.raises(OSError) as refused:
            open(mount.mountpoint / files[0], "r+b")  # noqa: SIM115 (refused before any use)
        assert refused.value.errno == errno.EROFS


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


def test_a_mount_reads_ahead_a_mebibyte_so_a_sequential_read_takes_few_requests(
    tmp_path: Path, mounts: object
) -> None:
    """The mount's read-ahead window is 1 MiB (FUSE's default is 128 KiB): reading an
    8 MiB file from start to end in 64 KiB steps takes about 8 READs, not 64."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    tree.mkdir()
    content = os.urandom(8 << 20)
    (tree / "big.bin").write_bytes(content)
    image = tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{tree}", "--store", os.fspath(store), "--output", os.fspath(image))
    with mounts(image, tmp_path / "mnt", "--store", os.fspath(store),  # type: ignore[operator]
                "--cache-dir", os.fspath(tmp_path / "cache")) as mount:
        device = os.stat(mount.mountpoint).st_dev
        knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        assert knob.read_text().strip() == str(kernelcache.READ_AHEAD_KIB)
        before = mount.stats()["fs"]["reads"]
        read = bytearray()
        with (mount.mountpoint / "big.bin").open("rb", buffering=0) as file:
            while piece := file.read(64 << 10):
                read += piece
        assert read == content
        requests = mount.stats()["fs"]["reads"] - before
        assert 8 <= requests <= 12, requests
