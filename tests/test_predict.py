"""Prefetching without a profile: opening an executable fetches its ELF closure
(``PT_INTERP``, ``DT_NEEDED``) before the loader asks. Real images holding this host's
``/bin/sh`` and its libraries, real mounts served by nginx; hostile ELF headers are only
ignored."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import blake3
import pytest

from ocixfs.image.format import Entry, Kind, Manifest
from ocixfs.image.tree import Tree
from ocixfs.mount.predict import resolve
from tests.mounting import Mounts, is_mounted, needs_fuse, store_args, wait_for
from tests.nginx import Nginx
from tests.test_mount import blob_requests, build, make_rootfs


def test_resolve_follows_symlinks_inside_the_image() -> None:
    entries = {
        "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13": Entry(kind=Kind.REGULAR, mode=0o644),
        "/usr/lib/x86_64-linux-gnu/libz.so.1": Entry(kind=Kind.SYMLINK, mode=0o777,
                                                     target="libz.so.1.2.13"),
        "/lib": Entry(kind=Kind.SYMLINK, mode=0o777, target="usr/lib"),
        "/lib64": Entry(kind=Kind.SYMLINK, mode=0o777, target="/lib/../lib64-real"),
        "/loop": Entry(kind=Kind.SYMLINK, mode=0o777, target="/loop"),
    }
    tree = Tree.from_manifest(Manifest(version=1, entries=entries))
    found = resolve(tree, "/lib/x86_64-linux-gnu/libz.so.1")
    assert found is not None and found.path == "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13"
    assert resolve(tree, "/lib64/ld-linux-x86-64.so.2") is None
    assert resolve(tree, "/loop/x") is None
    assert resolve(tree, "/lib/x86_64-linux-gnu") is None  # a directory


SH = os.fspath(Path(shutil.which("sh") or "/bin/sh").resolve()).lstrip("/")  # in the image too


def _hostile_elves() -> dict[str, bytes]:
    """ELF64 files whose headers point outside themselves: the program headers, the
    dynamic section, a library name's string."""
    def elf(phoff: int, phnum: int, tail: bytes) -> bytes:
        head = bytearray(64)
        head[:6] = b"\x7fELF\x02\x01"
        struct.pack_into("<Q", head, 0x20, phoff)
        struct.pack_into("<HH", head, 0x36, 56, phnum)
        return bytes(head) + tail

    size = 64 + 2 * 56 + 64 + 16

    def headers(dynamic_at: int) -> bytes:
        load = struct.pack("<IIQQQQQQ", 1, 4, 0, 0, 0, size, size, 4096)
        dynamic = struct.pack("<IIQQQQQQ", 2, 4, dynamic_at, 0, 0, 64, 64, 8)
        return load + dynamic

    entries = b"".join(struct.pack("<qQ", tag, value) for tag, value in (
        (5, 64 + 2 * 56 + 64), (10, 16), (1, 5000), (0, 0)))  # DT_NEEDED name at 5000
    return {
        "phdrs-beyond": elf(1 << 40, 3, b"\0" * 200),
        "dynamic-beyond": elf(64, 2, headers(1 << 30) + entries + b"libc.so.6\0".ljust(16)),
        "name-beyond": elf(64, 2, headers(64 + 2 * 56) + entries + b"libc.so.6\0".ljust(16)),
    }


def _libc_blobs() -> set[str]:
    """The request paths of libc's blobs: 1 MiB chunks (the build's default)."""
    data = Path("/lib/x86_64-linux-gnu/libc.so.6").read_bytes()
    pieces = [data[at:at + (1 << 20)] for at in range(0, len(data), 1 << 20)]
    return {"/blobs/blake3/" + blake3.blake3(piece).hexdigest() for piece in pieces}


@needs_fuse
@pytest.mark.mount
def test_opening_a_program_prefetches_its_loader_and_libraries(
    tmp_path: Path, mounts: Mounts
) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    for name, data in _hostile_elves().items():
        hostile = root / "usr/bin" / name
        hostile.write_bytes(data)
        hostile.chmod(0o755)
    store = tmp_path / "store"
    image = build(root, store, tmp_path / "image.ocix")
    with Nginx(store, tmp_path / "nginx") as server:
        with mounts(image, tmp_path / "mnt", *store_args([server.url], tmp_path / "c1")) as mount:
            assert mount.stats()["predict"] == {"followed": 0, "predicted": 0, "blobs": 0,
                                                "failed_blobs": 0}
            for name in [*_hostile_elves(), "tool"]:  # broken or not ELF: nothing predicted
                assert (mount.mountpoint / "usr/bin" / name).read_bytes()[:2] in (b"\x7fE", b"#!")
            with open(mount.mountpoint / SH, "rb") as program:
                assert program.read(4) == b"\x7fELF"

            def followed_all() -> bool:
                stats = mount.stats()["predict"]
                return isinstance(stats, dict) and stats["followed"] == 7

            # the three hostile files, the script, /bin/sh, libc and ld.so
            wait_for(followed_all, what="the predictor following seven files")
            stats = mount.stats()["predict"]
            assert isinstance(stats, dict)
            # libc, and ld.so three times: the interpreter of /bin/sh and of libc, and
            # needed by libc
            assert (stats["predicted"], stats["failed_blobs"]) == (4, 0)
            assert stats["blobs"] >= 7
            wait_for(lambda: _libc_blobs() <= set(blob_requests(server)), what="libc fetched")
            assert mount.stats()["background_failures"] == {}
        with mounts(image, tmp_path / "mnt", *store_args([server.url], tmp_path / "c2"),
                    "--prefetch", "none") as mount:
            assert mount.stats()["predict"] is None
            before = len(blob_requests(server))
            (mount.mountpoint / SH).read_bytes()
            assert len(blob_requests(server)) == before + 1  # the program alone
    assert not is_mounted(tmp_path / "mnt")
    assert os.listdir(tmp_path / "mnt") == []
