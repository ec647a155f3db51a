"""Cache lifecycle through real mounts: a full disk fails only the reads that needed
space, and several daemons keep one shared cache under a small quota."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import blake3
import pytest
import trio

from ocixfs.cache.blobs import Cache
from ocixfs.cache.layout import scan_blobs
from ocixfs.image.format import decode
from tests.faultserver import FaultServer
from tests.mounting import Mount, needs_fuse, run_ocixfs, wait_for
from tests.test_cache_lifecycle import content, fill, names, small_filesystem, tmp_files

pytestmark = [needs_fuse, pytest.mark.mount]

KiB = 1 << 10
MiB = 1 << 20


def build(source: Path, store: Path, output: Path, *args: str) -> Path:
    run_ocixfs("build", f"dir:{source}", "--store", os.fspath(store), "--output",
               os.fspath(output), "--no-progress", *args)
    return output


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def reread_through_fuse(path: Path) -> bytes:
    """Read a file again from the daemon, not from the kernel's page cache."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


def test_full_disk_fails_only_the_reads_that_need_space(tmp_path: Path) -> None:
    source = tmp_path / "rootfs"
    source.mkdir()
    big = content("big", 3 * MiB)
    (source / "big.bin").write_bytes(big)
    smalls = {f"small-{i}.txt": content(f"small-{i}", 2000 + i) for i in range(3)}
    for name, data in smalls.items():
        (source / name).write_bytes(data)
    store = tmp_path / "store"
    image = build(source, store, tmp_path / "image.ocix", "--format-version", "0")
    with (
        small_filesystem(tmp_path / "small", "4m") as small,
        FaultServer(store) as server,
        Mount(image, tmp_path / "mnt", "--store", server.url, "--cache-dir",
              os.fspath(small / "cache"), "--cache-max-size", "unlimited", "--prefetch", "none",
              "--deadline", "10", "--log-file", os.fspath(tmp_path / "daemon.log")) as mount,
    ):
        fs = os.statvfs(small)
        ballast = small / "ballast"
        ballast.write_bytes(bytes(fs.f_bavail * fs.f_frsize - 1 * MiB))
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "big.bin").read_bytes()
        assert caught.value.errno == errno.EIO
        assert "cache full while writing blob" in (tmp_path / "daemon.log").read_text()
        for name, data in smalls.items():
            assert (mount.mountpoint / name).read_bytes() == data
        assert mount.stats()["pid"] == mount.pid
        assert tmp_files(small / "cache") == []
        ballast.unlink()
        wait_for(lambda: read_or_none(mount.mountpoint / "big.bin") == big, 60,
                 "the read to work once there is room")
        assert blake3.blake3(big).hexdigest() in names(small / "cache")


def _image_blobs(image: Path) -> set[str]:
    manifest = decode(image.read_bytes())
    return {chunk.hex for entry in manifest.entries.values() for chunk in entry.blobs}


def test_two_mounts_keep_a_shared_cache_under_a_small_quota(tmp_path: Path) -> None:
    store, cache = tmp_path / "store", tmp_path / "cache"
    sources: dict[str, dict[str, bytes]] = {}
    images: dict[str, Path] = {}
    for name in ("a", "b"):
        files = {f"file-{i}": content(f"{name}-{i}", 150 * KiB + i) for i in range(6)}
        files["chunked.bin"] = content(f"{name}-chunked", 3 * MiB // 2)  # more than the quota
        root = tmp_path / f"root-{name}"
        root.mkdir()
        for file, data in files.items():
            (root / file).write_bytes(data)
        sources[name] = files
        images[name] = build(root, store, tmp_path / f"{name}.ocix", "--chunk-size", "256K")
    limit = 1 * MiB
    options = ["--store", "", "--cache-dir", os.fspath(cache), "--cache-max-size", "1M",
               "--prefetch", "none"]
    with FaultServer(store) as server:
        options[1] = server.url
        mounts = {name: Mount(images[name], tmp_path / f"mnt-{name}", *options)
                  for name in images}
        try:
            for mount in mounts.values():
                mount.start()
            problems: list[str] = []

            def read_all(name: str, again: bool) -> None:
                for file, data in sources[name].items():
                    path = mounts[name].mountpoint / file
                    got = reread_through_fuse(path) if again else path.read_bytes()
                    if got != data:
                        problems.append(f"{name}/{file}")

            for again in (False, True):
                threads = [threading.Thread(target=read_all, args=(name, again))
                           for name in mounts]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert problems == []
                assert scan_blobs(cache / "blobs").bytes <= limit
            total = sum(len(d) for files in sources.values() for d in files.values())
            assert server.count("*") > total // (256 * KiB)  # evicted blobs were fetched again
            for mount in mounts.values():
                assert mount.stats()["pid"] == mount.pid

            stats = json.loads(run_ocixfs("cache", "stats", "--cache-dir", os.fspath(cache),
                                          "--json").stdout)
            assert {m["mountpoint"] for m in stats["mounts"]} == {
                os.fspath(m.mountpoint) for m in mounts.values()
            }
            with Cache(cache, rescan=False) as direct:
                stray = trio.run(fill, direct, content("no image has this", 1000))
            run_ocixfs("cache", "gc", "--cache-dir", os.fspath(cache), "--all-unused")
            left = names(cache)
            assert stray.hex not in left
            assert left and left <= _image_blobs(images["a"]) | _image_blobs(images["b"])
            assert run_ocixfs("cache", "fsck", "--cache-dir", os.fspath(cache)).returncode == 0
        finally:
            for mount in mounts.values():
                mount.stop()
