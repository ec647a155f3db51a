"""Each kind of ``ocixfs build`` SOURCE: OCI layouts, docker archives, tarballs, directories."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ocixfs.build.builder import BuildOptions, build_image
from ocixfs.errors import BuildError
from ocixfs.image.format import Kind, Manifest, decode
from tests.imagetools import (
    CAP_NET_RAW,
    MTIME,
    directory,
    file,
    make_rootfs,
    snapshot_dir,
    snapshot_manifest,
    tar_bytes,
    whiteout,
    write_docker_archive,
    write_oci_layout,
)

OPTIONS = BuildOptions(progress=False, threads=2)
BASE = [directory("etc"), file("etc/os-release", b"ID=test\n"), file("etc/motd", b"hi\n")]
UPPER = [whiteout("etc/motd"), file("etc/issue", b"welcome\n", mode=0o600)]
EXPECTED = {"/etc", "/etc/os-release", "/etc/issue"}


def build(tmp_path: Path, source: str, options: BuildOptions = OPTIONS) -> Manifest:
    output = tmp_path / "image.ocix"
    build_image(source, store=tmp_path / "store", output=output, options=options)
    return decode(output.read_bytes())


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_oci_layout_layer_compressions(tmp_path: Path, compression: str | None) -> None:
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes(BASE, compression=compression),
                                                 tar_bytes(UPPER, compression=compression)])
    manifest = build(tmp_path, f"oci:{layout}:latest")
    assert set(manifest.entries) == EXPECTED
    assert manifest.entries["/etc/issue"].mode == 0o600


def test_docker_media_type(tmp_path: Path) -> None:
    layout = write_oci_layout(
        tmp_path / "oci", [tar_bytes(BASE, compression="gzip")],
        media_types=["application/vnd.docker.image.rootfs.diff.tar.gzip"])
    assert "/etc/motd" in build(tmp_path, f"oci:{layout}").entries


def test_oci_layout_picks_ref_and_platform(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes(BASE)], ref="base",
                              platform_index=True)
    write_oci_layout(layout, [tar_bytes(BASE), tar_bytes(UPPER)], ref="app:1.0")
    assert set(build(tmp_path, f"oci:{layout}:app:1.0").entries) == EXPECTED
    assert "/etc/motd" in build(tmp_path, f"oci:{layout}:base").entries


def test_oci_layout_names_its_images_when_ambiguous(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes(BASE)], ref="one")
    write_oci_layout(layout, [tar_bytes(UPPER)], ref="two")
    with pytest.raises(BuildError, match=r"holds 2 images; name one as .*names: one, two\)"):
        build(tmp_path, f"oci:{layout}")
    with pytest.raises(BuildError, match=r"no image named 'three' \(names: one, two\)"):
        build(tmp_path, f"oci:{layout}:three")


def test_oci_index_without_the_platform(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes(BASE)], platform_index=True)
    with pytest.raises(BuildError, match="no manifest for linux/riscv64"):
        build(tmp_path, f"oci:{layout}", BuildOptions(progress=False, platform="linux/riscv64"))


def test_not_an_oci_layout(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not an OCI image layout"):
        build(tmp_path, f"oci:{tmp_path}")
    with pytest.raises(BuildError, match="no such file or directory"):
        build(tmp_path, f"oci:{tmp_path}/missing:ref")


def test_docker_archive(tmp_path: Path) -> None:
    archive = write_docker_archive(tmp_path / "image.tar", [
        tar_bytes(BASE), tar_bytes(UPPER, compression="gzip")], repo_tags=["example:1"])
    assert set(build(tmp_path, f"docker-archive:{archive}").entries) == EXPECTED
    assert set(build(tmp_path, f"docker-archive:{archive}:example:1").entries) == EXPECTED
    with pytest.raises(BuildError, match=r"no image tagged 'example:2' \(tags: example:1\)"):
        build(tmp_path, f"docker-archive:{archive}:example:2")


def test_docker_archive_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "plain.tar").write_bytes(tar_bytes(BASE))
    with pytest.raises(BuildError, match="not a docker archive"):
        build(tmp_path, f"docker-archive:{tmp_path / 'plain.tar'}")


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_tar_rootfs_any_compression_same_manifest(tmp_path: Path,
                                                  compression: str | None) -> None:
    (tmp_path / "plain.tar").write_bytes(tar_bytes(BASE))
    (tmp_path / "rootfs.tar").write_bytes(tar_bytes(BASE, compression=compression))
    build(tmp_path, f"tar:{tmp_path / 'plain.tar'}")
    plain = (tmp_path / "image.ocix").read_bytes()
    build(tmp_path, f"tar:{tmp_path / 'rootfs.tar'}")
    assert (tmp_path / "image.ocix").read_bytes() == plain


def test_tar_from_stdin(tmp_path: Path) -> None:
    output = tmp_path / "image.ocix"
    subprocess.run(
        [sys.executable, "-m", "ocixfs", "build", "tar:-", "--store", str(tmp_path / "store"),
         "--output", str(output), "--no-progress"],
        input=tar_bytes(BASE, compression="zstd"), check=True, capture_output=True)
    assert set(decode(output.read_bytes()).entries) == {"/etc", "/etc/os-release", "/etc/motd"}


def test_xz_tarball_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rootfs.tar.xz").write_bytes(b"\xfd7zXZ\x00" + b"\x00" * 100)
    with pytest.raises(BuildError, match="xz-compressed tar archives are not supported"):
        build(tmp_path, f"tar:{tmp_path / 'rootfs.tar.xz'}")


def test_dir_source_keeps_everything(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    manifest = build(tmp_path, f"dir:{root}")
    assert snapshot_manifest(manifest, tmp_path / "store", mtimes=True) == \
        snapshot_dir(root, mtimes=True)
    entries = manifest.entries
    assert entries["/aping"].kind is Kind.REGULAR  # the lowest of the three names
    assert entries["/usr/bin/ping"].target == "/aping"
    assert entries["/aping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert entries["/aping"].mode == 0o4755
    assert entries["/tmp"].mode == 0o1777
    assert entries["/big.bin"].mtime == MTIME * 10**9 + 123456789
    assert entries["/big.bin"].chunks is not None


def test_dir_source_skips_sockets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "file").write_bytes(b"x")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(root / "sock"))
        manifest = build(tmp_path, f"dir:{root}")
    assert set(manifest.entries) == {"/", "/file"}
    assert "skipping sockets" in caplog.text


def test_dir_source_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(BuildError, match="not a directory"):
        build(tmp_path, f"dir:{tmp_path / 'f'}")


def test_unknown_source_kind(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown source type 'docker'"):
        build(tmp_path, "docker://debian")
    with pytest.raises(BuildError, match="bad source"):
        build(tmp_path, "rootfs")
