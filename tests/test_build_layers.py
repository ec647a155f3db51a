"""Layer semantics of ``ocixfs build`` and the one-line errors for malformed layers."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import tracemalloc
from pathlib import Path
from typing import IO

import pytest

from ocixfs.build.builder import BuildOptions, BuildSummary, build_image
from ocixfs.build.layers import BuildTree, FileContent, PendingContent, apply_tar_layer
from ocixfs.errors import BuildError
from ocixfs.image.format import Kind, Limits, Manifest, decode
from tests.imagetools import (
    TarEntry,
    directory,
    file,
    hardlink,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
    write_oci_layout,
)

OPTIONS = BuildOptions(progress=False, threads=2)


def build_layers(tmp_path: Path, *layers: list[TarEntry],
                 options: BuildOptions = OPTIONS) -> tuple[Manifest, BuildSummary]:
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes(layer) for layer in layers])
    output = tmp_path / "image.ocix"
    summary = build_image(f"oci:{layout}", store=tmp_path / "store", output=output,
                          options=options)
    return decode(output.read_bytes()), summary


def build_error(tmp_path: Path, *layers: list[TarEntry]) -> str:
    with pytest.raises(BuildError) as caught:
        build_layers(tmp_path, *layers)
    message = str(caught.value)
    assert "\n" not in message
    assert not (tmp_path / "image.ocix").exists()
    return message


def test_whiteout_only_hides_lower_layers(tmp_path: Path) -> None:
    manifest, _ = build_layers(
        tmp_path,
        [file("a", b"lower"), file("b", b"lower")],
        [file("a", b"upper"), whiteout("a"), whiteout("b"), whiteout("never-existed")],
    )
    assert set(manifest.entries) == {"/a"}
    assert manifest.entries["/a"].size == len(b"upper")


def test_opaque_directory_keeps_this_layers_entries(tmp_path: Path) -> None:
    manifest, _ = build_layers(
        tmp_path,
        [directory("d"), file("d/old"), directory("d/sub"), file("d/sub/old")],
        [file("d/sub/new"), opaque("d"), file("d/after")],
    )
    assert set(manifest.entries) == {"/d", "/d/sub", "/d/after", "/d/sub/new"}


def test_replacing_types(tmp_path: Path) -> None:
    manifest, _ = build_layers(
        tmp_path,
        [directory("dir"), file("dir/child"), file("file", b"x"), directory("keep"),
         file("keep/child")],
        [file("dir", b"now a file"), directory("file", mode=0o700),
         directory("keep", mode=0o711, uid=7)],
    )
    entries = manifest.entries
    assert entries["/dir"].kind is Kind.REGULAR and "/dir/child" not in entries
    assert entries["/file"].kind is Kind.DIRECTORY and entries["/file"].mode == 0o700
    assert entries["/keep"].mode == 0o711 and entries["/keep"].uid == 7
    assert "/keep/child" in entries


def test_hardlink_group_targets_canonically_lowest_name(tmp_path: Path) -> None:
    manifest, summary = build_layers(
        tmp_path,
        [directory("zz"), file("zz/long-name", b"shared", mode=0o755),
         hardlink("b", "zz/long-name"), hardlink("a", "b")],
    )
    entries = manifest.entries
    assert entries["/a"].kind is Kind.REGULAR and entries["/a"].mode == 0o755
    assert entries["/b"].kind is Kind.HARDLINK and entries["/b"].target == "/a"
    assert entries["/zz/long-name"].target == "/a"
    assert summary.regular_files == 1


def test_hardlink_to_symlink_is_copied(tmp_path: Path) -> None:
    manifest, _ = build_layers(tmp_path, [symlink("s", "target"), hardlink("t", "s")])
    assert manifest.entries["/s"].kind is Kind.SYMLINK
    assert manifest.entries["/t"] == manifest.entries["/s"]


def test_replaced_name_leaves_hardlink_partner(tmp_path: Path) -> None:
    manifest, _ = build_layers(
        tmp_path,
        [file("a", b"one inode"), hardlink("b", "a")],
        [file("a", b"another")],
    )
    assert manifest.entries["/b"].kind is Kind.REGULAR
    assert manifest.entries["/b"].size == len(b"one inode")
    assert manifest.entries["/a"].size == len(b"another")


def test_paths_are_normalised_and_resolved_through_symlinks(tmp_path: Path) -> None:
    manifest, _ = build_layers(
        tmp_path,
        [directory("./usr/"), symlink("lib", "/usr/lib64"), file("./x/../y", b"y")],
        [file("lib/libc.so", b"c"), file("/abs", b"leading slash")],
    )
    entries = manifest.entries
    assert "/usr/lib64/libc.so" in entries and entries["/usr/lib64"].mode == 0o755
    assert "/y" in entries and "/x" not in entries and "/abs" in entries
    assert entries["/lib"].target == "/usr/lib64"


def test_metadata_from_pax_headers(tmp_path: Path) -> None:
    manifest, _ = build_layers(tmp_path, [
        directory(".", mode=0o700, mtime=1_600_000_000),
        file("f", b"f", uid=1000, gid=100, uname="user", gname="users", mode=0o6751,
             mtime="1700000000.123456789",
             xattrs={"security.capability": b"\x01\x00\x00\x02", "security.selinux": b"x"}),
    ])
    root, entry = manifest.entries["/"], manifest.entries["/f"]
    assert root.mode == 0o700 and root.mtime == 1_600_000_000 * 10**9
    assert entry.mtime == 1_700_000_000_123_456_789
    assert (entry.uid, entry.gid, entry.username, entry.groupname) == (1000, 100, "user",
                                                                      "users")
    assert entry.mode == 0o6751
    # security.selinux is host-specific: umoci ignores it, so do we
    assert entry.xattrs == {"security.capability": b"\x01\x00\x00\x02"}


# -- malformed layers ---------------------------------------------------------------------


def test_hardlink_to_missing_file(tmp_path: Path) -> None:
    message = build_error(tmp_path, [file("a")], [hardlink("b", "nothere")])
    assert message.startswith("layer 2/2 (sha256:")
    assert message.endswith("b: hard link to missing file nothere")


def test_hardlink_to_file_of_a_later_entry_is_missing(tmp_path: Path) -> None:
    message = build_error(tmp_path, [hardlink("b", "a"), file("a")])
    assert "b: hard link to missing file a" in message


def test_hardlink_to_directory(tmp_path: Path) -> None:
    message = build_error(tmp_path, [directory("d"), hardlink("l", "d")])
    assert message.endswith("l: hard link to directory d")


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "/.."])
def test_path_escaping_the_root(tmp_path: Path, name: str) -> None:
    message = build_error(tmp_path, [file(name)])
    assert message.endswith(f"{name}: path {name} escapes the root")


def test_hardlink_target_escaping_the_root(tmp_path: Path) -> None:
    message = build_error(tmp_path, [file("a"), hardlink("b", "../a")])
    assert message.endswith("b: path ../a escapes the root")


def test_parent_is_not_a_directory(tmp_path: Path) -> None:
    message = build_error(tmp_path, [file("f"), file("f/child")])
    assert message.endswith("f/child: parent f is not a directory")


def test_root_replaced_by_a_file(tmp_path: Path) -> None:
    message = build_error(tmp_path, [file("./")])
    assert "the root can only be a directory" in message


def test_symlink_loop_in_parent(tmp_path: Path) -> None:
    message = build_error(tmp_path, [symlink("a", "b"), symlink("b", "a"), file("a/x")])
    assert message.endswith("a/x: too many levels of symbolic links")


def test_malformed_whiteout(tmp_path: Path) -> None:
    message = build_error(tmp_path, [directory("d"), file("d/.wh.")])
    assert message.endswith("d/.wh.: malformed whiteout")


def test_name_that_is_not_utf8(tmp_path: Path) -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    message = build_error(tmp_path, [file(name)])
    assert message.endswith("path is not valid UTF-8")


def test_not_a_tar_archive(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "oci", [b"this is not a tar archive" * 40])
    with pytest.raises(BuildError, match=r"^layer 1/1 \(sha256:\w+\): not a valid tar archive"):
        build_image(f"oci:{layout}", store=tmp_path / "s", output=tmp_path / "o",
                    options=OPTIONS)


def test_truncated_gzip_layer(tmp_path: Path) -> None:
    layer = tar_bytes([file("big", bytes(range(256)) * 4096)], compression="gzip")
    layout = write_oci_layout(tmp_path / "oci", [layer[: len(layer) // 2]])
    with pytest.raises(BuildError, match=r"^layer 1/1 \(sha256:\w+\): "):
        build_image(f"oci:{layout}", store=tmp_path / "s", output=tmp_path / "o",
                    options=OPTIONS)
    assert not (tmp_path / "o").exists()


def test_corrupt_layer_blob(tmp_path: Path) -> None:
    layer = tar_bytes([file("a", b"original")])
    layout = write_oci_layout(tmp_path / "oci", [layer])
    blob = layout / "blobs" / "sha256" / hashlib.sha256(layer).hexdigest()
    blob.write_bytes(layer.replace(b"original", b"modified"))
    with pytest.raises(BuildError, match="blob content does not match its digest"):
        build_image(f"oci:{layout}", store=tmp_path / "s", output=tmp_path / "o",
                    options=OPTIONS)


def test_unknown_media_type(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes([file("a")])],
                              media_types=["application/vnd.example.layer.v1.squashfs"])
    with pytest.raises(BuildError, match=r"unsupported layer media type "
                                         r"application/vnd\.example\.layer\.v1\.squashfs$"):
        build_image(f"oci:{layout}", store=tmp_path / "s", output=tmp_path / "o",
                    options=OPTIONS)


def test_unsupported_tar_entry_type(tmp_path: Path) -> None:
    info = tarfile.TarInfo("vol")
    info.type = b"V"  # a GNU volume header: meaningless in a layer
    message = build_error(tmp_path, [TarEntry(info)])
    assert "vol: unsupported tar entry type" in message


def test_failed_build_keeps_previous_output(tmp_path: Path) -> None:
    build_layers(tmp_path, [file("a", b"good")])
    before = (tmp_path / "image.ocix").read_bytes()
    (tmp_path / "oci").rename(tmp_path / "oci-good")
    layout = write_oci_layout(tmp_path / "oci", [tar_bytes([hardlink("x", "missing")])])
    with pytest.raises(BuildError):
        build_image(f"oci:{layout}", store=tmp_path / "store", output=tmp_path / "image.ocix",
                    options=OPTIONS)
    assert (tmp_path / "image.ocix").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _empty_files_layer(path: Path, count: int) -> None:
    """A gzip tar layer of ``count`` empty files, written member by member (a real file)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for number in range(count):
            archive.addfile(tarfile.TarInfo(f"f{number}"))


def test_a_layer_past_the_entry_limit_is_refused_while_it_is_read(tmp_path: Path) -> None:
    """60,000 empty files against a limit of 1,000: refused at the 1,001st, having built
    about a thousand nodes (memory follows the limit, not the layer)."""
    layer = tmp_path / "layer.tar.gz"
    _empty_files_layer(layer, 60_000)
    tree = BuildTree(limits=Limits(max_entries=1000))
    tracemalloc.start()
    try:
        with gzip.open(layer, "rb") as stream, pytest.raises(BuildError) as caught:
            apply_tar_layer(tree, stream, _NoContent(), name="layer")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(caught.value) == "layer: f1000: the image has more than 1000 entries (the limit)"
    assert peak < 8 << 20


def test_the_entry_count_follows_replacements_and_whiteouts(tmp_path: Path) -> None:
    lower = [directory("d"), file("d/a"), file("d/b"), file("x"), directory("e"), file("e/1")]
    upper = [whiteout("d"), file("x", mode=0o600), opaque("e"), file("e/2"), file("n/m")]
    tree = BuildTree()
    for number, entries in enumerate([lower, upper]):
        with io.BytesIO(tar_bytes(entries)) as stream:
            apply_tar_layer(tree, stream, _NoContent(), name=f"layer{number}")
    assert tree.entries == len(tree.to_entries(version=1)[0]) == 5  # x e e/2 n n/m


def test_a_name_path_or_size_over_the_manifest_limits_is_refused_while_reading(
    tmp_path: Path,
) -> None:
    deep = "/".join(["d" * 200] * 21)  # 4,220 bytes
    assert "path longer than 4096 bytes" in build_error(tmp_path / "1", [file(deep)])
    message = build_error(tmp_path / "2", [file("n" * 256)])
    assert message.endswith(f"{'n' * 256}: a name longer than 255 bytes")
    message = build_error(tmp_path / "3", [symlink("s", "t" * 4097)])
    assert message.endswith("s: symlink target longer than 4096 bytes")


class _NoContent:
    """A ``ContentSink`` for empty files only (the layers above hold nothing else)."""

    def from_stream(self, stream: IO[bytes], size: int) -> PendingContent:
        assert size == 0
        return _Empty()

    def from_path(self, path: str, size: int) -> PendingContent:
        raise AssertionError(path)


class _Empty:
    def result(self) -> FileContent:
        return FileContent(0, None)
