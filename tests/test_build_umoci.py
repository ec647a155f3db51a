"""The correctness bar of ``ocixfs build``: for a layered OCI image, the tree in the
manifest equals what ``umoci unpack`` (run as root) produces from the same image."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ocixfs.build.builder import BuildOptions, build_image
from ocixfs.image.format import Kind, decode
from tests.imagetools import (
    CAP_NET_RAW,
    FileState,
    block_device,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    opaque,
    snapshot_dir,
    snapshot_manifest,
    symlink,
    tar_bytes,
    whiteout,
    write_oci_layout,
)

pytestmark = pytest.mark.skipif(
    shutil.which("umoci") is None or os.geteuid() != 0,
    reason="needs umoci and root (devices, owners, security.capability)",
)

BIG = bytes(range(256)) * 9000  # 2.3 MB: three chunks


def layers() -> list[bytes]:
    base = [
        directory(".", mode=0o755, mtime=1_690_000_000),
        directory("etc"),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file("etc/doomed", b"gone in layer 2"),
        fifo("etc/initctl", mode=0o600),
        directory("usr", mtime="1700000001.5"),
        directory("usr/bin"),
        file("usr/bin/ping", b"\x7fELF ping", mode=0o4755,
             xattrs={"security.capability": CAP_NET_RAW}),
        hardlink("usr/bin/ping6", "usr/bin/ping"),
        file("usr/bin/newgrp", b"newgrp", mode=0o2755, gid=42, gname="shadow"),
        file("usr/bin/old", b"old binary"),
        symlink("lib", "usr/lib"),
        directory("dev"),
        char_device("dev/null", 1, 3, mode=0o666),
        block_device("dev/loop0", 7, 0),
        directory("tmp", mode=0o1777),
        directory("home"),
        directory("home/user", uid=1000, gid=1000, mode=0o700),
        file("home/user/notes", b"notes", uid=1000, gid=1000, mode=0o600,
             mtime="1700000000.123456789", xattrs={"user.tag": b"\xff\xfe binary"}),
        directory("opt"),
        directory("opt/app"),
        file("opt/app/lower", b"lower"),
        directory("opt/app/sub"),
        file("opt/app/sub/deep", b"deep"),
        directory("var"),
        directory("var/cache"),
        file("var/cache/x", b"x"),
        file("var/tobedir", b"file, becomes a directory"),
        file("big.bin", BIG),
        file("empty", b""),
    ]
    middle = [
        whiteout("etc/doomed"),
        # a later entry replacing a hardlinked name leaves the other names alone
        file("usr/bin/ping6", b"ping6 is its own file now", mode=0o755),
        # cross-layer hardlink to a file of the lower layer
        hardlink("usr/bin/ping-again", "usr/bin/ping"),
        hardlink("aaa", "usr/bin/old"),
        # written through the symlink /lib -> usr/lib (implicit usr/lib)
        file("lib/libc.so.6", b"libc"),
        directory("opt/app"),
        opaque("opt/app"),
        file("opt/app/upper", b"upper"),
        # a directory replaced by a file drops its children; a file replaced by a directory
        file("var/cache", b"not a directory any more"),
        directory("var/tobedir", mode=0o750),
        file("var/tobedir/child", b"child"),
    ]
    top = [
        # whiteout of a directory whose child this layer writes first: the child stays
        file("home/user/new", b"new", uid=1000),
        whiteout("home/user"),
        whiteout("usr/bin/old"),
        directory("etc", mode=0o750, xattrs={"user.dir": b"attr"}),
        file("etc/hostname", b"example\n"),
    ]
    return [tar_bytes(base, compression="gzip"), tar_bytes(middle),
            tar_bytes(top, compression="gzip")]


def test_manifest_tree_equals_umoci_unpack(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "oci", layers(), ref="v1")
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    unpacked = snapshot_dir(tmp_path / "bundle" / "rootfs", mtimes=True)

    summary = build_image(f"oci:{layout}:v1", store=tmp_path / "store",
                          output=tmp_path / "image.ocix", options=BuildOptions(progress=False))
    manifest = decode((tmp_path / "image.ocix").read_bytes())
    built = snapshot_manifest(manifest, tmp_path / "store", mtimes=True)

    # umoci leaves "now" as the mtime of implicit directories (/usr/lib), of the parent
    # it creates one in (/usr) and of a directory whose children a whiteout of the
    # directory itself deleted (/home/user): compare all but those mtimes.
    mtime_is_now = {"/usr/lib", "/usr", "/home/user"}
    assert set(built) == set(unpacked)
    differences = []
    for path in sorted(unpacked):
        want, got = unpacked[path], built[path]
        if path in mtime_is_now or want.kind is Kind.SYMLINK:
            want, got = _without_mtime(want), _without_mtime(got)
        if got != want:
            differences.append(f"{path}: built {got} != unpacked {want}")
    assert differences == []
    # The cases the image was made of really are there.
    assert built["/usr/bin/ping"].links == {"/usr/bin/ping-again"}
    assert built["/usr/bin/ping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert built["/usr/bin/ping"].mode == 0o4755
    assert built["/aaa"].links == frozenset()  # its other name was whited out
    assert "/etc/doomed" not in built and "/opt/app/lower" not in built
    assert built["/home/user/new"].kind is Kind.REGULAR
    assert "/home/user/notes" not in built
    assert built["/dev/null"].rdev == (1, 3) and built["/etc/initctl"].kind is Kind.FIFO
    assert built["/home/user/new"].uid == 1000
    assert manifest.entries["/usr/bin/ping-again"].kind is Kind.HARDLINK
    assert manifest.entries["/usr/bin/ping-again"].target == "/usr/bin/ping"
    assert manifest.entries["/big.bin"].chunks is not None
    assert summary.regular_files == sum(1 for e in manifest.entries.values()
                                        if e.kind is Kind.REGULAR)


def _without_mtime(state: FileState) -> FileState:
    return FileState(**{**state.__dict__, "mtime": None})
