"""``ocixfs diff`` and ``ocixfs dedup`` on images built (by ``ocixfs build``) from trees and
OCI layouts that differ in known ways; every count and byte total is asserted exactly."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from ocixfs.cli import main
from ocixfs.image.format import Kind
from ocixfs.image.loading import load_image
from ocixfs.image.tree import Tree
from ocixfs.store.layout import blob_path
from ocixfs.tools.compare import Measure, diff_images
from tests.imagetools import directory, file, tar_bytes, whiteout, write_oci_layout

MiB = 1 << 20


def content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


BASE = {
    "etc/hostname": b"base\n",
    "etc/config": content(1, 1000),
    "etc/attr": b"attr\n",
    "usr/lib/libbig.so": content(2, 3 * MiB + 1000),  # four chunks of the default 1 MiB
    "usr/bin/tool": content(3, 5000),
    "usr/share/doc/readme": content(4, 2000),
    "var/old/file": content(5, 300),
    "home/user/notes": content(6, 100),
}
BASE_BYTES = sum(len(data) for data in BASE.values())  # every base blob is distinct
VARIANTS: dict[str, tuple[dict[str, bytes], list[str]]] = {
    "v1": ({"opt/v1.bin": content(11, 10_000)}, []),
    "v2": ({"opt/v2.bin": content(12, 20_000), "etc/hostname": b"v2\n"}, []),
    "v3": ({"opt/v3.bin": content(13, 30_000)}, ["usr/share/doc/readme"]),
}


@pytest.fixture(autouse=True)
def fresh_log_handler() -> Iterator[None]:
    """``main()`` binds its stderr log handler once per process; drop it after each test."""
    logger = logging.getLogger("ocixfs")
    saved = logger.handlers[:]
    yield
    logger.handlers[:] = saved


def write_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.setxattr(root / "etc" / "attr", "user.a", b"1")
    os.chmod(root / "usr" / "bin" / "tool", 0o755)
    return root


def variant_files(name: str) -> dict[str, bytes]:
    added, removed = VARIANTS[name]
    files = {**BASE, **added}
    for path in removed:
        del files[path]
    return files


def build(source: str, store: Path, output: Path, *args: str) -> Path:
    assert main(["build", source, "--store", str(store), "-o", str(output), "--no-progress",
                 *args]) == 0
    return output


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


# ---- diff -----------------------------------------------------------------------------------


@pytest.fixture
def old_and_new(tmp_path: Path) -> tuple[Path, Path]:
    old = write_tree(tmp_path / "old", BASE)
    (old / "link").symlink_to("usr/bin")
    new = write_tree(tmp_path / "new", {**BASE, "etc/hostname": b"changed!\n",
                                        "link": b"was a link",
                                        "opt/new/data": content(21, 4000),
                                        "usr/share/doc/readme2": BASE["usr/share/doc/readme"]})
    (new / "var" / "old" / "file").unlink()
    (new / "var" / "old").rmdir()
    os.chmod(new / "usr" / "bin" / "tool", 0o4755)
    os.chown(new / "home" / "user" / "notes", 1001, 1001)
    os.setxattr(new / "etc" / "attr", "user.a", b"2")
    with (new / "usr" / "lib" / "libbig.so").open("r+b") as f:  # one byte of chunk 1
        f.seek(MiB + 12345)
        f.write(b"\0" if BASE["usr/lib/libbig.so"][MiB + 12345] else b"\1")
    store = tmp_path / "store"
    return build(f"dir:{old}", store, tmp_path / "old.ocix"), \
        build(f"dir:{new}", store, tmp_path / "new.ocix")


def test_diff_reports_exact_changes_and_fetch_cost(old_and_new: tuple[Path, Path]) -> None:
    old, new = (load_image(str(path)).manifest for path in old_and_new)
    result = diff_images(old, new)
    assert {c.path: c.kind for c in result.added} == {
        "/opt": Kind.DIRECTORY, "/opt/new": Kind.DIRECTORY, "/opt/new/data": Kind.REGULAR,
        "/usr/share/doc/readme2": Kind.REGULAR,
    }
    assert {c.path for c in result.removed} == {"/var/old", "/var/old/file"}
    assert {c.path: c.what for c in result.changed} == {
        "/etc/hostname": ("content",),
        "/usr/lib/libbig.so": ("content",),
        "/usr/bin/tool": ("mode",),
        "/home/user/notes": ("owner",),
        "/etc/attr": ("xattrs",),
        "/link": ("type",),
    }
    # New content: hostname, the former link, the added file and one chunk of libbig;
    # readme2 has readme's content, which a host with OLD already holds.
    assert result.fetch_blobs == 4
    assert result.fetch_bytes == len(b"changed!\n") + len(b"was a link") + 4000 + MiB
    assert result.new_blob_bytes == BASE_BYTES - 5 - 300 + 9 + 10 + 4000  # a chunk replaced
    assert result.old_blob_bytes == BASE_BYTES
    assert [c.path for c in result.changes()] == sorted(c.path for c in result.changes())


def test_diff_times_reports_mtimes(old_and_new: tuple[Path, Path]) -> None:
    old, new = (load_image(str(path)).manifest for path in old_and_new)
    timed = {c.path: c.what for c in diff_images(old, new, times=True).changed}
    assert timed["/etc/config"] == ("mtime",)  # rewritten, same bytes: only its time moved
    assert timed["/usr/bin/tool"] == ("mode", "mtime")


def test_diff_cli(old_and_new: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    old, new = map(str, old_and_new)
    document = run_json(capsys, "diff", old, new)
    assert document["fetch"] == {"blobs": 4, "bytes": 9 + 10 + 4000 + MiB}
    assert document["old"]["digest"] == load_image(old).digest
    changed = {c["path"]: c["what"] for c in document["changed"]}
    assert changed["/usr/lib/libbig.so"] == ["content"]
    capsys.readouterr()
    assert main(["diff", old, new]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["M", "/etc/attr", "xattrs"]
    assert "A  /opt/new/data" in "\n".join(lines)
    assert lines[-2] == "4 added, 2 removed, 6 changed"
    assert "a host that has OLD fetches 4 blobs, 1.05 MB" in lines[-1]


def test_diff_listing_is_truncated_unless_all(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    old.mkdir()
    new = write_tree(tmp_path / "new", {f"etc/f{i:03}": b"%d" % i for i in range(60)}
                     | {"etc/attr": b"a", "usr/bin/tool": b"t"})
    images = [build(f"dir:{root}", tmp_path / "s", tmp_path / f"{root.name}.ocix")
              for root in (old, new)]
    capsys.readouterr()
    assert main(["diff", *map(str, images)]) == 0
    out = capsys.readouterr().out
    assert "... and 15 more (--all lists every change)" in out  # 65 additions, 50 shown
    assert main(["diff", *map(str, images), "--all"]) == 0
    assert "more" not in capsys.readouterr().out


# ---- dedup ----------------------------------------------------------------------------------


EXPECTED_CONTENT = Measure(
    per_image=(BASE_BYTES + 10_000, BASE_BYTES - 5 + 3 + 20_000, BASE_BYTES - 2000 + 30_000),
    unique=(10_000, 3 + 20_000, 30_000),
    shared=BASE_BYTES - 5 - 2000,  # v2 replaced the hostname, v3 dropped the readme
    distinct=BASE_BYTES + 10_000 + 3 + 20_000 + 30_000,
)


def test_dedup_of_three_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    images = [str(build(f"dir:{write_tree(tmp_path / name, variant_files(name))}", store,
                        tmp_path / f"{name}.ocix", "--compress", "zstd"))
              for name in VARIANTS]
    document = run_json(capsys, "dedup", *images)
    assert document["content"] == {**EXPECTED_CONTENT.to_json(),
                                   "summed": sum(EXPECTED_CONTENT.per_image)}
    assert [i["files"] for i in document["images"]] == [9, 9, 8]
    assert document["zstd"] is None and document["oci"] is None
    assert document["distinct_blobs"] == len(BASE) + 3 + 3 + 1  # libbig: 4 chunks

    with_store = run_json(capsys, "dedup", *images, "--store", str(store))
    union = set()
    for image in images:
        tree = Tree.from_manifest(load_image(image).manifest)
        union |= {chunk.digest for node in tree.iter_files() for chunk in node.blobs}
    zst_sizes = sum(os.stat(f"{blob_path(store, d)}.zst").st_size for d in union)
    assert with_store["zstd"]["distinct"] == zst_sizes
    assert with_store["missing_blobs"] == 0

    capsys.readouterr()
    assert main(["dedup", *images, "--store", str(store)]) == 0
    out = capsys.readouterr().out
    header, first = out.splitlines()[:2]
    assert header.split() == ["IMAGE", "FILES", "SIZE", "CONTENT", "UNIQUE", "ZSTD", "ZSTD",
                              "UNIQUE"]
    assert first.split()[:2] == ["v1.ocix", "9"]
    assert "shared by all" in out and "stored once" in out
    assert "A host holding all 3 images fetches and stores 3.22 MB with OCIX" in out


def test_dedup_with_oci_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def layer(files: Mapping[str, bytes], removed: list[str]) -> bytes:
        dirs = sorted({str(Path(name).parent) for name in files} - {"."})
        entries = [directory(d) for d in dirs]
        entries += [file(name, data, xattrs={"user.a": b"1"} if name == "etc/attr" else None)
                    for name, data in files.items()]
        return tar_bytes([*entries, *map(whiteout, removed)], compression="gzip")

    base = layer(BASE, [])
    tops = {name: layer(*VARIANTS[name]) for name in VARIANTS}
    layout = tmp_path / "oci"
    for name, top in tops.items():
        write_oci_layout(layout, [base, top], ref=name)
    store = tmp_path / "store"
    images = [str(build(f"oci:{layout}:{name}", store, tmp_path / f"{name}.ocix"))
              for name in VARIANTS]
    document = run_json(capsys, "dedup", *images, *(a for n in VARIANTS
                                                    for a in ("--oci", f"{layout}:{n}")))
    assert document["content"]["distinct"] == EXPECTED_CONTENT.distinct
    assert document["content"]["shared"] == EXPECTED_CONTENT.shared
    sizes = [len(top) for top in tops.values()]
    assert document["oci"] == {
        "per_image": [len(base) + size for size in sizes],
        "unique": sizes,
        "shared": len(base),
        "distinct": len(base) + sum(sizes),
        "summed": 3 * len(base) + sum(sizes),
    }
    capsys.readouterr()
    assert main(["dedup", *images, "--oci", f"{layout}:v1"]) == 2
    assert capsys.readouterr().err == (
        "ocixfs: 1 --oci for 3 images (give one per image, in the same order)\n")
    assert main(["dedup", images[0], "--oci", f"{layout}:nope"]) == 2
    assert "no image named 'nope'" in capsys.readouterr().err
