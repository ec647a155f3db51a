"""Tier 4: real FUSE mounts of real images, served by a real HTTP server (nginx).

Each test builds an image from a directory tree with ``ocixfs build`` (the ``image``
fixture), serves the store with nginx (``server``), and runs ``ocixfs mount`` as a user would
(``mount_image``, or ``mounted`` for the default options). Teardown always unmounts.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import blake3
import pytest

from ocixfs.image.format import manifest_digest
from ocixfs.mount.profile import Profile, encode_profile
from tests.mounting import (
    OCIXFS,
    Mount,
    Mounts,
    is_mounted,
    needs_fuse,
    process_alive,
    run_ocixfs,
    store_args,
    wait_for,
)
from tests.nginx import Nginx
from tests.treecompare import differences

pytestmark = [needs_fuse, pytest.mark.mount]

MiB = 1 << 20


def _copy_with_libs(binary: str, root: Path) -> None:
    """Copy an executable and the shared libraries it needs (per ldd) into ``root``."""
    real = Path(shutil.which(binary) or binary).resolve()
    targets = {real}
    out = subprocess.run(["ldd", os.fspath(real)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                targets.add(Path(word))
    for path in targets:
        dest = root / os.fspath(path).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)
    bin_sh = root / "bin" / "sh"
    bin_sh.parent.mkdir(parents=True, exist_ok=True)
    if not bin_sh.exists():
        os.symlink(os.fspath(real), bin_sh)


def make_rootfs(root: Path, *, seed: int = 0) -> Path:
    """A small but complete-looking root filesystem: every entry kind, owners, xattrs."""
    root.mkdir(parents=True)
    _copy_with_libs("sh", root)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text(f"ocixfs-test-{seed}\n")
    (root / "etc" / "empty").write_bytes(b"")
    data = root / "usr" / "share" / "data"
    data.mkdir(parents=True)
    for i in range(20):
        (data / f"small-{i:02}.txt").write_bytes(os.urandom(100 + i * 37))
    (data / "large.bin").write_bytes(os.urandom(3 * MiB + 12345))  # 4 chunks in v1
    (data / "shared.txt").write_text("shared by every image\n" * 100)
    os.link(data / "shared.txt", data / "hardlink.txt")
    os.symlink("small-00.txt", data / "relative-link")
    os.symlink("/etc/hostname", root / "etc" / "absolute-link")
    tool = root / "usr" / "bin" / "tool"
    tool.parent.mkdir(parents=True, exist_ok=True)
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(tool, 0o4755)
    os.setxattr(
        tool, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000")
    )
    os.setxattr(data / "small-01.txt", "user.note", b"hello")
    owned = root / "home" / "user"
    owned.mkdir(parents=True)
    (owned / "file").write_text("mine\n")
    os.chown(owned, 1000, 1000)
    os.chown(owned / "file", 1000, 1001)
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.mkfifo(root / "etc" / "fifo")
    dev = root / "dev"
    dev.mkdir()
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(dev / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    return root


def build(source: Path, store: Path, output: Path, *args: str) -> Path:
    """A plain store unless ``args`` say otherwise: these tests tamper with and count the
    plain blobs (zstd stores are tested in test_fetcher and the benchmark)."""
    if "--compress" not in args:
        args = ("--compress", "none", *args)
    run_ocixfs(
        "build", f"dir:{source}", "--store", os.fspath(store), "--output", os.fspath(output), *args
    )
    return output


def blob_requests(server: Nginx) -> list[str]:
    return [path for path in server.requests() if "/blobs/" in path]


class Image(NamedTuple):
    root: Path
    store: Path
    ocix: Path


@pytest.fixture
def format_version() -> str | None:
    """``--format-version`` of the ``image`` build (None: the default); tests parametrize it."""
    return None


@pytest.fixture
def image(tmp_path: Path, format_version: str | None) -> Image:
    """The rootfs of ``make_rootfs``, its store, and the image built from it."""
    root = make_rootfs(tmp_path / "rootfs")
    store = tmp_path / "store"
    version = () if format_version is None else ("--format-version", format_version)
    return Image(root, store, build(root, store, tmp_path / "image.ocix", *version))


@pytest.fixture
def server(tmp_path: Path, image: Image) -> Iterator[Nginx]:
    """nginx serving the image's store."""
    with Nginx(image.store, tmp_path / "nginx") as nginx:
        yield nginx


MountImage = Callable[..., Mount]


@pytest.fixture
def mount_image(tmp_path: Path, image: Image, server: Nginx, mounts: Mounts) -> MountImage:
    """``mount_image(*more)``: a ``Mount`` (to start with ``with``) of the image at
    ``tmp_path / at``, from ``stores`` (default: ``server``) with the cache
    ``tmp_path / cache`` and the options ``more``; ``ocix`` mounts another image."""

    def make(
        *more: str,
        stores: Sequence[str] = (),
        at: str = "mnt",
        cache: str = "cache",
        ocix: Path | None = None,
    ) -> Mount:
        args = store_args(stores or [server.url], tmp_path / cache, *more)
        return mounts(ocix or image.ocix, tmp_path / at, *args)

    return make


@pytest.fixture
def mounted(mount_image: MountImage) -> Iterator[Mount]:
    """The image, mounted from ``server`` with the default options."""
    with mount_image() as mount:
        yield mount


@pytest.mark.parametrize("format_version", ["0", "1"])
def test_mounted_tree_equals_source(image: Image, mounted: Mount, format_version: str) -> None:
    problems = differences(image.root, mounted.mountpoint, check_xattrs=format_version == "1")
    assert problems == []
    st = os.lstat(mounted.mountpoint / "usr/share/data/shared.txt")
    assert st.st_nlink == 2
    assert st.st_ino == os.lstat(mounted.mountpoint / "usr/share/data/hardlink.txt").st_ino


def test_reading_one_file_fetches_only_its_blobs(server: Nginx, mounted: Mount) -> None:
    subprocess.run(["find", os.fspath(mounted.mountpoint), "-ls"], capture_output=True, check=True)
    assert blob_requests(server) == [], "metadata must not touch the network"
    data = (mounted.mountpoint / "etc/hostname").read_bytes()
    assert data == b"ocixfs-test-0\n"
    assert blob_requests(server) == [f"/blobs/blake3/{blake3.blake3(data).hexdigest()}"]


def test_partial_read_of_chunked_file_fetches_touched_chunks(
    image: Image, server: Nginx, mounted: Mount
) -> None:
    with open(mounted.mountpoint / "usr/share/data/large.bin", "rb") as f:
        f.seek(2 * MiB + 100)
        got = f.read(1000)
    large = (image.root / "usr/share/data/large.bin").read_bytes()
    assert got == large[2 * MiB + 100 : 2 * MiB + 1100]
    # The kernel's read-ahead and ours may add the next chunk, never all four.
    assert 1 <= len(blob_requests(server)) <= 2


def test_tampered_blob_is_never_served(
    tmp_path: Path, image: Image, mount_image: MountImage
) -> None:
    good = (image.root / "etc/hostname").read_bytes()
    blob = image.store / "blobs" / "blake3" / blake3.blake3(good).hexdigest()
    blob.write_bytes(b"evil-test-0!!\n")  # same length, wrong bytes
    with mount_image("--deadline", "5") as mount:
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "etc/hostname").read_bytes()
        assert caught.value.errno == errno.EIO
        cached = [
            p
            for p in (tmp_path / "cache").rglob("*")
            if p.is_file() and p.read_bytes() == b"evil-test-0!!\n"
        ]
        assert cached == []
        assert (mount.mountpoint / "etc/absolute-link").is_symlink()  # still serving
        stats = mount.stats()
        assert stats["pid"] == mount.pid


def test_tampered_blob_falls_back_to_next_mirror(
    tmp_path: Path, image: Image, server: Nginx, mount_image: MountImage
) -> None:
    good = (image.root / "etc/hostname").read_bytes()
    bad_store = tmp_path / "bad-store"
    shutil.copytree(image.store, bad_store)
    (bad_store / "blobs" / "blake3" / blake3.blake3(good).hexdigest()).write_bytes(
        b"evil-test-0!!\n"
    )
    with (
        Nginx(bad_store, tmp_path / "bad") as bad,
        mount_image(stores=[bad.url, server.url]) as mount,
    ):
        assert (mount.mountpoint / "etc/hostname").read_bytes() == good
        assert len(blob_requests(bad)) >= 1
        assert len(blob_requests(server)) == 1


def test_server_gone_cached_files_work_uncached_fail_fast(
    image: Image, server: Nginx, mount_image: MountImage
) -> None:
    source_hostname = (image.root / "etc/hostname").read_bytes()
    with mount_image("--deadline", "3") as mount:
        hostname = mount.mountpoint / "etc/hostname"
        assert hostname.read_bytes() == source_hostname
        server.stop()
        assert hostname.read_bytes() == source_hostname
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "usr/share/data/small-05.txt").read_bytes()
        assert caught.value.errno == errno.EIO
        assert (
            time.monotonic() - started < 3 * 2 + 10
        )  # the deadline (twice: kernel retries) + slack
        assert mount.stats()["pid"] == mount.pid
        assert (mount.mountpoint / "etc/hostname").read_bytes() == source_hostname


def test_second_image_fetches_only_what_it_does_not_share(
    tmp_path: Path, image: Image, server: Nginx, mount_image: MountImage
) -> None:
    second_root = tmp_path / "second"
    subprocess.run(["cp", "-a", os.fspath(image.root), os.fspath(second_root)], check=True)
    (second_root / "etc" / "hostname").write_text("the second image\n")
    second = build(second_root, image.store, tmp_path / "second.ocix")

    def read_all_text_files(mount: Mount) -> None:
        texts = (mount.mountpoint / "usr/share/data").glob("*.txt")
        subprocess.run(["cat", *map(os.fspath, texts)], capture_output=True, check=True)

    with mount_image(at="m1") as m1:
        read_all_text_files(m1)
    before = len(blob_requests(server))
    with mount_image(at="m2", ocix=second) as m2:
        read_all_text_files(m2)
        assert len(blob_requests(server)) == before
        assert (m2.mountpoint / "etc/hostname").read_text() == "the second image\n"
        assert len(blob_requests(server)) == before + 1


def test_chroot_runs_a_program_from_the_mount(mounted: Mount) -> None:
    script = 'read h < /etc/hostname; echo "$h"'
    result = subprocess.run(
        ["chroot", os.fspath(mounted.mountpoint), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ocixfs-test-0\n"


def test_writes_fail_read_only(mounted: Mount) -> None:
    for attempt in (
        lambda: (mounted.mountpoint / "new").write_text("x"),
        lambda: os.open(mounted.mountpoint / "etc/hostname", os.O_RDWR),
        lambda: (mounted.mountpoint / "etc/hostname").unlink(),
        lambda: (mounted.mountpoint / "dir").mkdir(),
    ):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS


def test_suid_and_dev_are_off_unless_asked(mount_image: MountImage) -> None:
    """Both for a first mount (FUSE) and a later one (stacked: the overlay gets them)."""
    with mount_image(at="m1") as mount:
        fstype, options = _mount_options(mount.mountpoint)
        assert fstype == "fuse.ocixfs"
        assert {"ro", "nosuid", "nodev"} <= options
        assert "noexec" not in options
        assert "allow_other" in options or os.geteuid() != 0
    with mount_image(at="m2") as mount:
        fstype, options = _mount_options(mount.mountpoint)
        assert {"ro", "nosuid", "nodev"} <= options and "noexec" not in options
    with mount_image("-o", "suid,dev,noexec,noatime,x-systemd.automount,_netdev", at="m3") as mount:
        fstype, options = _mount_options(mount.mountpoint)
        assert "nosuid" not in options and "nodev" not in options
        assert {"noexec", "noatime"} <= options
    from ocixfs.mount.stacking import kernel_can_stack

    assert fstype == "overlay" or os.geteuid() != 0 or not kernel_can_stack()


def _mount_options(mountpoint: Path) -> tuple[str, set[str]]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == os.fspath(mountpoint):
                assert fields[2] in ("fuse.ocixfs", "overlay")
                return fields[2], set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} not mounted")


def test_bad_manifest_mounts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ocix"
    bad.write_bytes(b"\xd9\xd9\xf7 not a manifest")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_ocixfs(
        "mount", os.fspath(bad), os.fspath(mnt), "--store", os.fspath(tmp_path), check=False
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ocixfs: ")
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)


def test_umount_waits_for_daemon_and_sigterm_unmounts(mount_image: MountImage) -> None:
    mount = mount_image()
    with mount:
        pid = mount.pid
        assert pid is not None
        run_ocixfs("umount", os.fspath(mount.mountpoint))
        assert not is_mounted(mount.mountpoint)
        assert not process_alive(pid)
    with mount:
        pid = mount.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not is_mounted(mount.mountpoint), what="unmount after SIGTERM")
        wait_for(lambda: not process_alive(pid), what="daemon exit after SIGTERM")


def test_foreground_notifies_systemd_when_ready(
    tmp_path: Path, image: Image, server: Nginx
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(os.fspath(notify_path))
        notify.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": os.fspath(notify_path)}
        process = subprocess.Popen(
            [
                *OCIXFS,
                "mount",
                "--foreground",
                os.fspath(image.ocix),
                os.fspath(mnt),
                *store_args(server.url, tmp_path / "cache"),
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            message = notify.recv(4096)
            assert message.startswith(b"READY=1")
            assert is_mounted(mnt)
            assert (mnt / "etc/hostname").read_text() == "ocixfs-test-0\n"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            assert not is_mounted(mnt)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mnt)], capture_output=True)


def test_profile_recorded_in_order_and_played_back(
    tmp_path: Path, image: Image, server: Nginx, mount_image: MountImage
) -> None:
    order = [
        "etc/hostname",
        "usr/share/data/small-03.txt",
        "usr/bin/tool",
        "usr/share/data/large.bin",
    ]
    recorded = os.fspath(tmp_path / "start.profile")
    with mount_image("--record-profile", recorded, "--prefetch", "none", cache="c1") as mount:
        for name in order:
            (mount.mountpoint / name).read_bytes()
    shown = run_ocixfs("profile", "show", recorded, "--json").stdout
    paths = [path for path, _ in json.loads(shown)["entries"]]
    assert paths == ["/" + name for name in order]
    before = len(blob_requests(server))
    with mount_image("--prefetch", recorded, cache="c2") as mount:
        wait_for(lambda: (mount.stats()["prefetch"] or {}).get("finished") is True, what="prefetch")
        prefetched = len(blob_requests(server)) - before
        assert prefetched == 1 + 1 + 1 + 4  # three small files and four chunks
        server.stop()  # everything the profile named is local now
        for name in order:
            assert (mount.mountpoint / name).read_bytes() == (image.root / name).read_bytes()


def test_a_profile_beside_a_url_manifest_is_played_unless_prefetch_is_none(
    tmp_path: Path, image: Image, server: Nginx, mounts: Mounts
) -> None:
    shutil.copy(image.ocix, image.store / "app.ocix")  # served by nginx, beside the blobs
    played = ["/etc/hostname", "/usr/share/data/small-05.txt"]
    (image.store / "app.ocix.profile").write_bytes(
        encode_profile(Profile(tuple((path, n) for n, path in enumerate(played))))
    )
    url = server.url.rstrip("/") + "/app.ocix"
    with mounts(url, tmp_path / "mnt", *store_args([server.url], tmp_path / "c1")) as mount:
        wait_for(lambda: (mount.stats()["prefetch"] or {}).get("finished") is True, what="prefetch")
        assert "/app.ocix.profile" in server.requests()
        prefetched = sorted(blob_requests(server))
        expected = sorted(
            f"/blobs/blake3/{blake3.blake3((image.root / p[1:]).read_bytes()).hexdigest()}"
            for p in played
        )
        assert prefetched == expected
    args = store_args([server.url], tmp_path / "c2", "-o", "prefetch=none")
    with mounts(url, tmp_path / "mnt", *args) as mount:
        assert mount.stats()["prefetch"] is None


def test_stats_wait_follows_prefetch_all_until_the_image_is_local(
    mount_image: MountImage, mounted: Mount
) -> None:
    with mount_image("--prefetch", "all", at="warm", cache="warm-cache") as mount:
        waited = run_ocixfs("stats", os.fspath(mount.mountpoint), "--wait", "--json")
        stats = json.loads(waited.stdout)
        assert stats["prefetch"]["finished"] is True
        assert stats["prefetch"]["failed_blobs"] == 0
        files = stats["image_files"]
        assert files["files_local"] == files["files"] and files["bytes_local"] == files["bytes"]
    idle = run_ocixfs("stats", os.fspath(mounted.mountpoint), "--wait", "--json")
    assert json.loads(idle.stdout)["prefetch"] is None  # nothing to wait for


def test_stats_wait_exits_1_when_blobs_could_not_be_prefetched(
    image: Image, mount_image: MountImage
) -> None:
    hostname = blake3.blake3((image.root / "etc/hostname").read_bytes()).hexdigest()
    (image.store / "blobs" / "blake3" / hostname).unlink()
    with mount_image("--prefetch", "all") as mount:
        waited = run_ocixfs("stats", os.fspath(mount.mountpoint), "--wait", check=False)
        assert waited.returncode == 1
        assert waited.stderr.strip().count("\n") == 0
        assert "1 blobs could not be prefetched" in waited.stderr


def test_a_manifest_served_gzip_compressed_is_used(
    tmp_path: Path, image: Image, server: Nginx, mounts: Mounts
) -> None:
    manifest = image.ocix.read_bytes()
    (image.store / "app.ocix.gz").write_bytes(gzip.compress(manifest))
    (image.store / "app.ocix").write_bytes(b"only the .gz beside me is the manifest")
    url = server.url.rstrip("/") + "/app.ocix"
    with mounts(url, tmp_path / "mnt", *store_args([server.url], tmp_path / "cache")) as mount:
        assert (mount.mountpoint / "etc/hostname").read_bytes() == b"ocixfs-test-0\n"
        assert mount.stats()["image_digest"] == manifest_digest(manifest)  # of the CBOR


def test_cached_profile_is_used_by_the_next_mount_of_the_image(
    tmp_path: Path, mount_image: MountImage
) -> None:
    with mount_image() as mount:
        (mount.mountpoint / "etc/hostname").read_bytes()
        (mount.mountpoint / "usr/share/data/small-07.txt").read_bytes()
        digest = str(mount.stats()["image_digest"])
    profiles = list((tmp_path / "cache" / "profiles").glob("*.profile"))
    assert [p.name for p in profiles] == [digest.removeprefix("b3:") + ".profile"]
    with mount_image() as mount:
        stats = mount.stats()["prefetch"]
        assert isinstance(stats, dict) and stats["planned_blobs"] == 2
