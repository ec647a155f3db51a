"""Tier 4: real FUSE mounts of real images, served by a real HTTP server (nginx).

Each test builds an image from a directory tree with ``ocixfs build``, serves the store with
nginx, and runs ``ocixfs mount`` as a user would. Teardown always unmounts.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import OCIXFS, Mount, is_mounted, needs_fuse, run_ocixfs, wait_for
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
    run_ocixfs(
        "build", f"dir:{source}", "--store", os.fspath(store), "--output", os.fspath(output), *args
    )
    return output


def blob_requests(server: Nginx) -> list[str]:
    return [path for path in server.requests() if "/blobs/" in path]


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(rootfs, store, image.ocix) for a v1 image."""
    root = make_rootfs(tmp_path / "rootfs")
    store = tmp_path / "store"
    yield root, store, build(root, store, tmp_path / "image.ocix")


@pytest.fixture
def server(tmp_path: Path, image: tuple[Path, Path, Path]) -> Iterator[Nginx]:
    with Nginx(image[1], tmp_path / "nginx") as nginx:
        yield nginx


@pytest.mark.parametrize("version", ["0", "1"])
def test_mounted_tree_equals_source(tmp_path: Path, version: str) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    store = tmp_path / "store"
    ocix = build(root, store, tmp_path / "image.ocix", "--format-version", version)
    with (
        Nginx(store, tmp_path / "nginx") as nginx,
        Mount(
            ocix,
            tmp_path / "mnt",
            "--store",
            nginx.url,
            "--cache-dir",
            os.fspath(tmp_path / "cache"),
        ) as mount,
    ):
        problems = differences(root, mount.mountpoint, check_xattrs=version == "1")
        assert problems == []
        st = os.lstat(mount.mountpoint / "usr/share/data/shared.txt")
        assert st.st_nlink == 2
        assert st.st_ino == os.lstat(mount.mountpoint / "usr/share/data/hardlink.txt").st_ino


def test_reading_one_file_fetches_only_its_blobs(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
    with Mount(
        ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", os.fspath(tmp_path / "cache")
    ) as mount:
        subprocess.run(
            ["find", os.fspath(mount.mountpoint), "-ls"], capture_output=True, check=True
        )
        assert blob_requests(server) == [], "metadata must not touch the network"
        data = (mount.mountpoint / "etc/hostname").read_bytes()
        assert data == b"ocixfs-test-0\n"
        import blake3

        assert blob_requests(server) == [f"/blobs/blake3/{blake3.blake3(data).hexdigest()}"]


def test_partial_read_of_chunked_file_fetches_touched_chunks(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    root, _, ocix = image
    with Mount(
        ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", os.fspath(tmp_path / "cache")
    ) as mount:
        with open(mount.mountpoint / "usr/share/data/large.bin", "rb") as f:
            f.seek(2 * MiB + 100)
            got = f.read(1000)
        assert (
            got == (root / "usr/share/data/large.bin").read_bytes()[2 * MiB + 100 : 2 * MiB + 1100]
        )
        # The kernel's read-ahead and ours may add the next chunk, never all four.
        assert 1 <= len(blob_requests(server)) <= 2


def test_tampered_blob_is_never_served(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    root, store, ocix = image
    import blake3

    good = (root / "etc/hostname").read_bytes()
    blob = store / "blobs" / "blake3" / blake3.blake3(good).hexdigest()
    blob.write_bytes(b"evil-test-0!!\n")  # same length, wrong bytes
    cache = tmp_path / "cache"
    with Mount(
        ocix,
        tmp_path / "mnt",
        "--store",
        server.url,
        "--cache-dir",
        os.fspath(cache),
        "--deadline",
        "5",
    ) as mount:
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "etc/hostname").read_bytes()
        assert caught.value.errno == errno.EIO
        cached = [
            p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == b"evil-test-0!!\n"
        ]
        assert cached == []
        assert (mount.mountpoint / "etc/absolute-link").is_symlink()  # still serving
        stats = mount.stats()
        assert stats["pid"] == mount.pid


def test_tampered_blob_falls_back_to_next_mirror(
    tmp_path: Path, image: tuple[Path, Path, Path]
) -> None:
    root, store, ocix = image
    import blake3

    good = (root / "etc/hostname").read_bytes()
    bad_store = tmp_path / "bad-store"
    shutil.copytree(store, bad_store)
    (bad_store / "blobs" / "blake3" / blake3.blake3(good).hexdigest()).write_bytes(
        b"evil-test-0!!\n"
    )
    with (
        Nginx(bad_store, tmp_path / "bad") as bad,
        Nginx(store, tmp_path / "good") as good_server,
        Mount(
            ocix,
            tmp_path / "mnt",
            "--store",
            bad.url,
            "--store",
            good_server.url,
            "--cache-dir",
            os.fspath(tmp_path / "cache"),
        ) as mount,
    ):
        assert (mount.mountpoint / "etc/hostname").read_bytes() == good
        assert len(blob_requests(bad)) >= 1
        assert len(blob_requests(good_server)) == 1


def test_server_gone_cached_files_work_uncached_fail_fast(
    tmp_path: Path, image: tuple[Path, Path, Path]
) -> None:
    root, store, ocix = image
    nginx = Nginx(store, tmp_path / "nginx")
    with (
        nginx,
        Mount(
            ocix,
            tmp_path / "mnt",
            "--store",
            nginx.url,
            "--cache-dir",
            os.fspath(tmp_path / "cache"),
            "--deadline",
            "3",
        ) as mount,
    ):
        hostname = mount.mountpoint / "etc/hostname"
        assert hostname.read_bytes() == (root / "etc/hostname").read_bytes()
        nginx.__exit__(None, None, None)
        assert hostname.read_bytes() == (root / "etc/hostname").read_bytes()
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "usr/share/data/small-05.txt").read_bytes()
        assert caught.value.errno == errno.EIO
        assert (
            time.monotonic() - started < 3 * 2 + 10
        )  # the deadline (twice: kernel retries) + slack
        assert mount.stats()["pid"] == mount.pid
        assert (mount.mountpoint / "etc/hostname").read_bytes() == (
            root / "etc/hostname"
        ).read_bytes()


def test_second_image_fetches_only_what_it_does_not_share(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first_root = make_rootfs(tmp_path / "first")
    second_root = tmp_path / "second"
    subprocess.run(["cp", "-a", os.fspath(first_root), os.fspath(second_root)], check=True)
    (second_root / "etc" / "hostname").write_text("the second image\n")
    first = build(first_root, store, tmp_path / "first.ocix")
    second = build(second_root, store, tmp_path / "second.ocix")
    cache = tmp_path / "cache"
    with Nginx(store, tmp_path / "nginx") as nginx:
        with Mount(
            first, tmp_path / "m1", "--store", nginx.url, "--cache-dir", os.fspath(cache)
        ) as m1:
            subprocess.run(
                ["cat", *[os.fspath(p) for p in (m1.mountpoint / "usr/share/data").glob("*.txt")]],
                capture_output=True,
                check=True,
            )
        before = len(blob_requests(nginx))
        with Mount(
            second, tmp_path / "m2", "--store", nginx.url, "--cache-dir", os.fspath(cache)
        ) as m2:
            subprocess.run(
                ["cat", *[os.fspath(p) for p in (m2.mountpoint / "usr/share/data").glob("*.txt")]],
                capture_output=True,
                check=True,
            )
            assert len(blob_requests(nginx)) == before
            assert (m2.mountpoint / "etc/hostname").read_text() == "the second image\n"
            assert len(blob_requests(nginx)) == before + 1


def test_chroot_runs_a_program_from_the_mount(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
    with Mount(
        ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", os.fspath(tmp_path / "cache")
    ) as mount:
        result = subprocess.run(
            [
                "chroot",
                os.fspath(mount.mountpoint),
                "/bin/sh",
                "-c",
                'read h < /etc/hostname; echo "$h"',
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "ocixfs-test-0\n"


def test_writes_fail_read_only(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
    with Mount(
        ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", os.fspath(tmp_path / "cache")
    ) as mount:
        for attempt in (
            lambda: (mount.mountpoint / "new").write_text("x"),
            lambda: os.open(mount.mountpoint / "etc/hostname", os.O_RDWR),
            lambda: (mount.mountpoint / "etc/hostname").unlink(),
            lambda: (mount.mountpoint / "dir").mkdir(),
        ):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EROFS


def test_suid_and_dev_are_off_unless_asked(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
    cache = os.fspath(tmp_path / "cache")
    with Mount(ocix, tmp_path / "m1", "--store", server.url, "--cache-dir", cache) as mount:
        options = _mount_options(mount.mountpoint)
        assert {"ro", "nosuid", "nodev"} <= options
        assert "noexec" not in options
        assert "allow_other" in options or os.geteuid() != 0
    with Mount(
        ocix,
        tmp_path / "m2",
        "--store",
        server.url,
        "--cache-dir",
        cache,
        "-o",
        "suid,dev,noexec,noatime,x-systemd.automount,_netdev",
    ) as mount:
        options = _mount_options(mount.mountpoint)
        assert "nosuid" not in options and "nodev" not in options
        assert {"noexec", "noatime"} <= options


def _mount_options(mountpoint: Path) -> set[str]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == os.fspath(mountpoint):
                assert fields[2] == "fuse.ocixfs"
                return set(fields[3].split(","))
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


def test_umount_waits_for_daemon_and_sigterm_unmounts(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
    mount = Mount(
        ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", os.fspath(tmp_path / "cache")
    )
    with mount:
        pid = mount.pid
        assert pid is not None
        run_ocixfs("umount", os.fspath(mount.mountpoint))
        assert not is_mounted(mount.mountpoint)
        assert not _alive(pid)
    with mount:
        pid = mount.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not is_mounted(mount.mountpoint), what="unmount after SIGTERM")
        wait_for(lambda: not _alive(pid), what="daemon exit after SIGTERM")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_foreground_notifies_systemd_when_ready(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
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
                os.fspath(ocix),
                os.fspath(mnt),
                "--store",
                server.url,
                "--cache-dir",
                os.fspath(tmp_path / "cache"),
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
    tmp_path: Path, image: tuple[Path, Path, Path]
) -> None:
    root, store, ocix = image
    order = [
        "etc/hostname",
        "usr/share/data/small-03.txt",
        "usr/bin/tool",
        "usr/share/data/large.bin",
    ]
    recorded = tmp_path / "start.profile"
    with Nginx(store, tmp_path / "nginx") as nginx:
        with Mount(
            ocix,
            tmp_path / "mnt",
            "--store",
            nginx.url,
            "--cache-dir",
            os.fspath(tmp_path / "c1"),
            "--record-profile",
            os.fspath(recorded),
            "--prefetch",
            "none",
        ) as mount:
            for name in order:
                (mount.mountpoint / name).read_bytes()
        shown = run_ocixfs("profile", "show", os.fspath(recorded), "--json").stdout
        import json

        paths = [path for path, _ in json.loads(shown)["entries"]]
        assert paths == ["/" + name for name in order]
        before = len(blob_requests(nginx))
        with Mount(
            ocix,
            tmp_path / "mnt",
            "--store",
            nginx.url,
            "--cache-dir",
            os.fspath(tmp_path / "c2"),
            "--prefetch",
            os.fspath(recorded),
        ) as mount:
            wait_for(
                lambda: (mount.stats()["prefetch"] or {}).get("finished") is True, what="prefetch"
            )
            prefetched = len(blob_requests(nginx)) - before
            assert prefetched == 1 + 1 + 1 + 4  # three small files and four chunks
            nginx.__exit__(None, None, None)  # everything the profile named is local now
            for name in order:
                assert (mount.mountpoint / name).read_bytes() == (root / name).read_bytes()


def test_cached_profile_is_used_by_the_next_mount_of_the_image(
    tmp_path: Path, image: tuple[Path, Path, Path], server: Nginx
) -> None:
    _, _, ocix = image
    cache = os.fspath(tmp_path / "cache")
    with Mount(ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", cache) as mount:
        (mount.mountpoint / "etc/hostname").read_bytes()
        (mount.mountpoint / "usr/share/data/small-07.txt").read_bytes()
        digest = str(mount.stats()["image_digest"])
    profiles = list((tmp_path / "cache" / "profiles").glob("*.profile"))
    assert [p.name for p in profiles] == [digest.removeprefix("b3:") + ".profile"]
    with Mount(ocix, tmp_path / "mnt", "--store", server.url, "--cache-dir", cache) as mount:
        stats = mount.stats()["prefetch"]
        assert isinstance(stats, dict) and stats["planned_blobs"] == 2
