"""The kernel serves a mount's metadata: the EROFS metadata image and stacked mounts.

Tier 2 (no FUSE): ``image.erofs`` writes an image that ``fsck.erofs`` accepts and that the
kernel, mounting it, shows exactly as the tree: every kind of entry, owners (shifted),
times, sizes with no data, xattrs, hardlinks, directories over many blocks, names that
sort before ``.``, symlinks too long to keep inline, and overlayfs's redirect to each
file's canonical path. Tier 4: real ``ocixfs mount``s of a real image over nginx: the
first mount serves through FUSE and keeps the metadata image; the next is an overlay whose
walk sends FUSE no metadata request; every way a mount ends leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from ocixfs.cache.index import write_metadata_image
from ocixfs.image.erofs import BOOT_SIZE, Unrepresentable, metadata_image
from ocixfs.image.format import Entry, Kind, Manifest
from ocixfs.image.tree import Tree
from ocixfs.mount.mounts import mount_type
from ocixfs.mount.stacking import Layers, kernel_can_stack
from tests.mounting import (
    OCIXFS,
    Mounts,
    is_mounted,
    process_alive,
    run_ocixfs,
    store_args,
    wait_for,
)
from tests.nginx import Nginx
from tests.test_mount import build, make_rootfs
from tests.treecompare import differences, walk, xattrs
from tests.treesamples import T0, canonical, regular, sample

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not kernel_can_stack() or shutil.which("fsck.erofs") is None,
    reason="needs root, Linux 6.12+ with EROFS and overlayfs, and erofs-utils")

TiB = 1 << 40
OVERLAY_XATTRS = ("trusted.overlay.metacopy", "trusted.overlay.redirect")


def _tree_with_everything() -> Tree:
    """The shared sample, plus what stresses the EROFS layout."""
    entries = dict(sample().manifest.entries)
    entries["/many"] = Entry(Kind.DIRECTORY, mode=0o750, uid=5, gid=6, mtime=T0)
    for i in range(450):  # about five directory blocks
        entries[f"/many/a-rather-long-file-name-{i:04}"] = regular(b"x" * (i % 7), mode=0o640,
                                                                   mtime=T0 + i)
    entries["/many/-dash"] = regular(b"sorts before the dot", mode=0o644, mtime=T0)
    entries["/many/+plus"] = Entry(Kind.SYMLINK, mode=0o777, mtime=T0, target="-dash")
    entries["/long-link"] = Entry(Kind.SYMLINK, mode=0o777, mtime=T0, target="t" * 4000)
    entries["/huge"] = Entry(Kind.REGULAR, mode=0o600, mtime=T0, size=5 * TiB,
                             digest=bytes(32))
    entries["/before-epoch"] = regular(b"old", mode=0o644, mtime=-1_000_000_000_123)
    return Tree.from_manifest(Manifest(1, canonical(entries)))


@pytest.fixture
def erofs_mount(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "erofs"
    mountpoint.mkdir()
    yield mountpoint
    subprocess.run(["umount", "-l", os.fspath(mountpoint)], capture_output=True)


def _mount_image(image: bytes | bytearray, tmp_path: Path, mountpoint: Path) -> None:
    path = tmp_path / "meta.erofs"
    path.write_bytes(image)
    fsck = subprocess.run(["fsck.erofs", os.fspath(path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["mount", "-t", "erofs", "-o", "ro", os.fspath(path), os.fspath(mountpoint)],
                   check=True, capture_output=True)


@pytest.mark.parametrize("shift", [0, 100_000])
def test_the_metadata_image_shows_the_tree(tmp_path: Path, erofs_mount: Path,
                                           shift: int) -> None:
    tree = _tree_with_everything()
    _mount_image(metadata_image(tree, uid_shift=shift, gid_shift=shift + 7, boot=b"boot"),
                 tmp_path, erofs_mount)
    seen = walk(erofs_mount)
    expected = {node.path for node in tree.iter_nodes()}
    hardlinks = {path for path, entry in sample().manifest.entries.items()
                 if entry.kind is Kind.HARDLINK}
    assert set(seen) == expected | hardlinks
    for path, st in seen.items():
        node = tree.node_by_path(path) or tree.node_by_path(
            sample().manifest.entries[path].target or "")
        assert node is not None, path
        where = erofs_mount / path.lstrip("/")
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns) == (
            node.mode, node.uid + shift, node.gid + shift + 7, node.nlink, node.mtime_ns), path
        found = xattrs(where)
        if node.kind is Kind.REGULAR and node.size:
            assert st.st_size == node.size, path
            assert found.pop("trusted.overlay.redirect") == node.path.encode(), path
            assert found.pop("trusted.overlay.metacopy") == b"", path
        assert found == dict(node.xattrs), path
        if node.kind is Kind.SYMLINK:
            assert os.readlink(where) == node.link_target.decode(), path
        if node.kind in (Kind.CHARACTER, Kind.BLOCK):
            assert st.st_rdev == node.rdev, path
        if node.kind is Kind.DIRECTORY:
            assert sorted(os.listdir(where)) == sorted(
                name.decode() for name, _ in node.listing()), path
    assert (erofs_mount / "huge").stat().st_size == 5 * TiB
    assert (erofs_mount / "etc" / "empty").read_bytes() == b""
    assert os.stat(erofs_mount / "usr/share/motd").st_ino == os.stat(
        erofs_mount / "etc/motd").st_ino
    assert (tmp_path / "meta.erofs").read_bytes()[:4] == b"boot"


@pytest.mark.parametrize(("name", "size"), [
    ("system.other", 1), ("trusted.overlay.opaque", 1), ("user.big", 1 << 16)])
def test_what_erofs_cannot_hold_is_refused(name: str, size: int) -> None:
    entries = dict(sample().manifest.entries)
    entries["/odd"] = regular(b"odd", mode=0o644, xattrs={name: b"v" * size})
    with pytest.raises(Unrepresentable, match="xattr"):
        metadata_image(Tree.from_manifest(Manifest(1, canonical(entries))))


def test_a_file_over_eight_tib_is_refused() -> None:
    entries = dict(sample().manifest.entries)
    entries["/vast"] = Entry(Kind.REGULAR, mode=0o644, size=9 * TiB, digest=bytes(32))
    with pytest.raises(Unrepresentable, match="8 TiB"):
        metadata_image(Tree.from_manifest(Manifest(1, canonical(entries))))


def test_a_metadata_image_is_only_opened_when_authenticated(tmp_path: Path) -> None:
    from ocixfs.cache.index import check_indexes, open_metadata_image

    tree, digest, cache = _tree_with_everything(), "b3:" + "ab" * 32, tmp_path / "cache"
    write_metadata_image(cache, digest, tree, uid_shift=3, gid_shift=4)
    [path] = (cache / "index").glob("*.erofs")
    assert path.name == f"{'ab' * 32}.3.4.erofs"
    assert open_metadata_image(cache, digest) is None  # other shifts
    fd = open_metadata_image(cache, digest, uid_shift=3, gid_shift=4)
    assert fd is not None
    os.close(fd)
    assert check_indexes(cache, remove=False).good == 1
    data = bytearray(path.read_bytes())
    data[BOOT_SIZE + 200] ^= 1  # inside the superblock
    path.write_bytes(data)
    assert open_metadata_image(cache, digest, uid_shift=3, gid_shift=4) is None
    assert check_indexes(cache).bad == (str(path),)
    assert not path.exists()


def test_an_image_verified_this_boot_is_not_read_again_unless_replaced(tmp_path: Path) -> None:
    """The note in the runtime directory stands for this boot, this inode and size: a
    later open skips reading the image (a bit flipped in place is then not seen, as the
    kernel's own page cache would not see it either), while a file replaced by a new one,
    as every writer here does, is checked again."""
    from ocixfs.cache.index import open_metadata_image

    tree, digest, cache = _tree_with_everything(), "b3:" + "cd" * 32, tmp_path / "cache"
    verified = tmp_path / "run" / "verified"
    write_metadata_image(cache, digest, tree)
    [path] = (cache / "index").glob("*.erofs")
    for _ in range(2):
        fd = open_metadata_image(cache, digest, verified=verified)
        assert fd is not None
        os.close(fd)
    assert (verified / path.name).read_text().split()[2:] == [
        str(os.stat(path).st_ino), str(os.stat(path).st_size)]
    with open(path, "r+b") as image:  # in place: same inode and size
        image.seek(BOOT_SIZE + 5000)
        image.write(b"\xff")
    assert open_metadata_image(cache, digest) is None  # read whole: refused
    fd = open_metadata_image(cache, digest, verified=verified)  # noted: trusted
    assert fd is not None
    os.close(fd)
    replacement = path.with_suffix(".new")
    replacement.write_bytes(path.read_bytes())
    replacement.rename(path)  # a new inode
    assert open_metadata_image(cache, digest, verified=verified) is None


# ---- real mounts ---------------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = make_rootfs(tmp_path / "rootfs")
    store = tmp_path / "store"
    return root, store, build(root, store, tmp_path / "image.ocix")


@pytest.fixture
def nginx(tmp_path: Path, rootfs: tuple[Path, Path, Path]) -> Iterator[Nginx]:
    with Nginx(rootfs[1], tmp_path / "nginx") as server:
        yield server


def _stats(mountpoint: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads(run_ocixfs("stats", os.fspath(mountpoint),
                                                      "--json").stdout)
    return result


def _fs_counters(mountpoint: Path) -> dict[str, int]:
    counters = _stats(mountpoint)["fs"]
    assert isinstance(counters, dict)
    return counters


def _metadata_served_by_kernel(mountpoint: Path) -> bool:
    caching = _stats(mountpoint)["kernel_caching"]
    assert isinstance(caching, dict)
    return bool(caching["metadata"])


def _mount_twice(mounts: Mounts, ocix: Path, mountpoint: Path, *args: str) -> None:
    """Mount once (FUSE; the metadata image is written once the mount is quiet), unmount,
    and mount again (stacked)."""
    cache = Path(args[args.index("--cache-dir") + 1])
    with mounts(ocix, mountpoint, *args):
        assert mount_type(mountpoint) == "fuse.ocixfs"
        assert not _metadata_served_by_kernel(mountpoint)
        wait_for(lambda: any((cache / "index").glob("*.erofs")), what="the metadata image")
    mounts(ocix, mountpoint, *args).start()
    assert mount_type(mountpoint) == "overlay"
    assert _metadata_served_by_kernel(mountpoint)


class Stacked(NamedTuple):
    """The ``rootfs`` image, stacked at ``mountpoint`` (``mount`` args: ``args``)."""

    root: Path
    ocix: Path
    mountpoint: Path
    args: list[str]


@pytest.fixture
def stacked(tmp_path: Path, rootfs: tuple[Path, Path, Path], nginx: Nginx,
            mounts: Mounts) -> Stacked:
    root, _, ocix = rootfs
    args = store_args(nginx.url, tmp_path / "cache")
    _mount_twice(mounts, ocix, tmp_path / "mnt", *args)
    return Stacked(root, ocix, tmp_path / "mnt", args)


def test_a_seen_image_is_stacked_and_walked_without_fuse(stacked: Stacked) -> None:
    root, mountpoint = stacked.root, stacked.mountpoint
    seen = walk(mountpoint)
    for path, st in seen.items():
        where = mountpoint / path.lstrip("/")
        xattrs(where)
        if stat.S_ISLNK(st.st_mode):
            os.readlink(where)
    counters = _fs_counters(mountpoint)
    assert (counters["listings"], counters["lookups"], counters["readlinks"]) == (0, 0, 0)
    shown = run_ocixfs("stats", os.fspath(mountpoint)).stdout
    assert "metadata     served by the kernel" in shown
    assert differences(root, mountpoint) == []
    assert _fs_counters(mountpoint)["lookups"] > 0  # contents come through FUSE
    assert not any(name in xattrs(mountpoint / "usr/share/data/large.bin")
                   for name in OVERLAY_XATTRS)
    assert not list((Path("/run/ocixfs/layers")).glob("*/*"))  # the layers are detached


def test_a_shifted_mount_is_stacked_with_shifted_owners(
        tmp_path: Path, rootfs: tuple[Path, Path, Path], nginx: Nginx, mounts: Mounts) -> None:
    root, _, ocix = rootfs
    mountpoint = tmp_path / "mnt"
    _mount_twice(mounts, ocix, mountpoint, *store_args(nginx.url, tmp_path / "cache"),
                 "-o", "uidshift=200000,gidshift=300000")
    owned = os.lstat(mountpoint / "home/user/file")
    assert (owned.st_uid, owned.st_gid) == (201000, 301001)
    assert (mountpoint / "etc/hostname").read_bytes() == (root / "etc/hostname").read_bytes()


def test_fuse_only_is_never_stacked(
        tmp_path: Path, rootfs: tuple[Path, Path, Path], nginx: Nginx, mounts: Mounts) -> None:
    _, _, ocix = rootfs
    args = store_args(nginx.url, tmp_path / "cache", "--fuse-only")
    for _ in range(2):
        with mounts(ocix, tmp_path / "mnt", *args):
            assert mount_type(tmp_path / "mnt") == "fuse.ocixfs"
    assert not list((tmp_path / "cache" / "index").glob("*.erofs"))


def test_an_image_erofs_cannot_hold_is_served_by_fuse(
        tmp_path: Path, mounts: Mounts) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    os.setxattr(root / "etc" / "hostname", "trusted.overlay.opaque", b"y")
    ocix = build(root, tmp_path / "store", tmp_path / "image.ocix")
    args = store_args(f"file://{tmp_path / 'store'}", tmp_path / "cache")
    for _ in range(2):
        with mounts(ocix, tmp_path / "mnt", *args):
            assert mount_type(tmp_path / "mnt") == "fuse.ocixfs"
            assert os.getxattr(tmp_path / "mnt/etc/hostname", "trusted.overlay.opaque") == b"y"


def test_every_end_of_a_stacked_mount_leaves_nothing(stacked: Stacked,
                                                     mounts: Mounts) -> None:
    _, ocix, mountpoint, args = stacked

    def ended_by(stop: str) -> None:
        mount = mounts(ocix, mountpoint, *args)
        if not is_mounted(mountpoint):
            mount.start()
        assert mount_type(mountpoint) == "overlay"
        pid = int(str(_stats(mountpoint)["pid"]))
        if stop == "umount":
            subprocess.run(["umount", os.fspath(mountpoint)], check=True)
        else:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not process_alive(pid), what=f"the daemon to end after {stop}")
        assert not is_mounted(mountpoint), stop
        assert not Layers.of(mountpoint, pid).root.exists(), stop

    ended_by("umount")
    ended_by("SIGTERM")

    mount = mounts(ocix, mountpoint, *args).start()
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(mount.pid or 0), what="the daemon to die")
    assert "large.bin" in os.listdir(mountpoint / "usr/share/data")  # the kernel's
    with pytest.raises(OSError) as raised:
        (mountpoint / "usr/share/data/large.bin").read_bytes()
    assert raised.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    refused = run_ocixfs("mount", os.fspath(ocix), os.fspath(mountpoint), *args, check=False)
    assert refused.returncode == 2 and "daemon is gone" in refused.stderr
    run_ocixfs("umount", os.fspath(mountpoint))
    assert not is_mounted(mountpoint)
    mounts(ocix, mountpoint, *args).start()  # and it mounts again
    assert mount_type(mountpoint) == "overlay"
    assert not list(Path("/run/ocixfs/layers").iterdir())  # every layer detached, removed


def test_a_tampered_metadata_image_is_rewritten_not_mounted(
        tmp_path: Path, stacked: Stacked, mounts: Mounts) -> None:
    root, ocix, mountpoint, args = stacked
    run_ocixfs("umount", os.fspath(mountpoint))
    [image] = (tmp_path / "cache" / "index").glob("*.erofs")
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF
    damaged = image.with_suffix(".damaged")
    damaged.write_bytes(data)
    damaged.rename(image)  # a new file: checked again (in place it counts once a boot)
    with mounts(ocix, mountpoint, *args):
        assert mount_type(mountpoint) == "fuse.ocixfs"
        assert differences(root, mountpoint) == []
        wait_for(lambda: image.read_bytes() != data, what="the image rewritten")
    with mounts(ocix, mountpoint, *args):
        assert mount_type(mountpoint) == "overlay"


def test_stacking_works_where_every_mount_is_shared(tmp_path: Path) -> None:
    """Under systemd every mount has shared propagation (``mount --make-rshared /``), where
    moving a mount is refused and mounts made in /run propagate: in a mount namespace set
    up that way, the first mount serves through FUSE, the next is stacked, and unmounting
    leaves nothing."""
    root = make_rootfs(tmp_path / "rootfs")
    ocix = build(root, tmp_path / "store", tmp_path / "image.ocix")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = " ".join([*OCIXFS, "mount", os.fspath(ocix), os.fspath(mountpoint),
                      *store_args(f"file://{tmp_path / 'store'}", tmp_path / "cache"),
                      "--no-service"])
    umount = " ".join([*OCIXFS, "umount", os.fspath(mountpoint)])
    where = f"grep ' {mountpoint} ' /proc/self/mounts | cut -d' ' -f3"
    script = f"""set -e
mount --make-rshared /
{mount}; {where}; cat {mountpoint}/etc/hostname; {umount}
{mount}; {where}; cat {mountpoint}/etc/hostname; {umount}
grep -c ' {mountpoint} ' /proc/self/mounts || true
"""
    done = subprocess.run(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fuse.ocixfs", "ocixfs-test-0", "overlay", "ocixfs-test-0",
                                   "0"]
