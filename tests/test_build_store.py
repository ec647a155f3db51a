"""Blobs from ``ocixfs build``: chunking, dedup across builds, zstd siblings, format v0,
the ``BlobStore`` writer itself, the progress bar and the command line."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import blake3
import pytest
import zstandard

from ocixfs.build.builder import BuildOptions, build_image
from ocixfs.cli import main
from ocixfs.errors import StoreError
from ocixfs.image.format import Kind, decode
from ocixfs.progress import Progress, format_bytes, format_duration
from ocixfs.store.layout import blob_path
from ocixfs.store.writer import BlobStore
from tests.imagetools import (
    CAP_NET_RAW,
    directory,
    file,
    make_rootfs,
    manifest_content,
    tar_bytes,
    write_oci_layout,
)

CHUNK = 64 << 10


def blobs_in(store: Path) -> set[str]:
    return {p.name for p in (store / "blobs" / "blake3").iterdir()}


def test_large_files_are_chunked(tmp_path: Path) -> None:
    content = os.urandom(2 * CHUNK + 1000)
    exact = os.urandom(CHUNK)
    (tmp_path / "rootfs.tar").write_bytes(tar_bytes([file("big", content), file("exact", exact)]))
    store = tmp_path / "store"
    build_image(f"tar:{tmp_path / 'rootfs.tar'}", store=store, output=tmp_path / "i.ocix",
                options=BuildOptions(chunk_size=CHUNK, progress=False))
    entries = decode((tmp_path / "i.ocix").read_bytes()).entries
    big = entries["/big"]
    assert big.digest == blake3.blake3(content).digest()
    assert big.chunks is not None
    assert [c.size for c in big.chunks] == [CHUNK, CHUNK, 1000]
    for n, chunk in enumerate(big.chunks):
        piece = content[n * CHUNK:(n + 1) * CHUNK]
        assert chunk.digest == blake3.blake3(piece).digest()
        assert blob_path(store, chunk.digest).read_bytes() == piece
    assert not blob_path(store, big.digest).exists()  # readers fetch the chunks only
    assert entries["/exact"].chunks is None
    assert blob_path(store, blake3.blake3(exact).digest()).read_bytes() == exact


def test_dir_source_chunks_match_tar_source(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    content = os.urandom(3 * CHUNK + 7)
    (root / "big").write_bytes(content)
    options = BuildOptions(chunk_size=CHUNK, progress=False)
    build_image(f"dir:{root}", store=tmp_path / "s1", output=tmp_path / "a.ocix",
                options=options)
    (tmp_path / "r.tar").write_bytes(tar_bytes([file("big", content)]))
    build_image(f"tar:{tmp_path / 'r.tar'}", store=tmp_path / "s2", output=tmp_path / "b.ocix",
                options=options)
    a = decode((tmp_path / "a.ocix").read_bytes()).entries["/big"]
    b = decode((tmp_path / "b.ocix").read_bytes()).entries["/big"]
    assert (a.digest, a.chunks) == (b.digest, b.chunks)
    assert blobs_in(tmp_path / "s1") == blobs_in(tmp_path / "s2")


def test_second_build_writes_only_new_blobs(tmp_path: Path) -> None:
    base = [directory("usr"), *(file(f"usr/f{i}", b"base %d" % i) for i in range(20))]
    store = tmp_path / "store"
    first_layout = write_oci_layout(tmp_path / "one", [tar_bytes(base, compression="gzip")])
    first = build_image(f"oci:{first_layout}", store=store, output=tmp_path / "1.ocix",
                        options=BuildOptions(progress=False))
    assert (first.new_blobs, first.existing_blobs) == (20, 0)
    before = {name: (store / "blobs/blake3" / name).stat().st_mtime_ns
              for name in blobs_in(store)}

    variant = [file("usr/f0", b"base 0", mode=0o755, mtime=1), file("app", b"the app")]
    second_layout = write_oci_layout(tmp_path / "two", [tar_bytes(base, compression="zstd"),
                                                        tar_bytes(variant)])
    second = build_image(f"oci:{second_layout}", store=store, output=tmp_path / "2.ocix",
                         options=BuildOptions(progress=False))
    assert (second.new_blobs, second.new_blob_bytes) == (1, len(b"the app"))
    assert second.existing_blobs == 20
    assert second.existing_blob_bytes == sum(len(b"base %d" % i) for i in range(20))
    for name, mtime in before.items():  # existing blobs were not rewritten
        assert (store / "blobs/blake3" / name).stat().st_mtime_ns == mtime


def test_compressed_store(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "rootfs", big_size=CHUNK * 2 + 5)
    store = tmp_path / "store"
    summary = build_image(f"dir:{root}", store=store, output=tmp_path / "i.ocix",
                          options=BuildOptions(compress="zstd", zstd_level=5,
                                               chunk_size=CHUNK, progress=False))
    names = blobs_in(store)
    raw = {n for n in names if not n.endswith(".zst")}
    assert {n + ".zst" for n in raw} == names - raw
    for name in raw:
        frame = (store / "blobs/blake3" / (name + ".zst")).read_bytes()
        data = zstandard.ZstdDecompressor().decompress(frame)
        assert data == (store / "blobs/blake3" / name).read_bytes()
        assert blake3.blake3(data).hexdigest() == name
    assert json.loads((store / "ocix-store.json").read_text()) == {"compression": ["zstd"]}
    assert summary.compressed_bytes > 0
    # A store that advertises zstd keeps getting .zst blobs without being told again.
    (root / "new").write_bytes(b"new file")
    build_image(f"dir:{root}", store=store, output=tmp_path / "i.ocix",
                options=BuildOptions(progress=False))
    assert blake3.blake3(b"new file").hexdigest() + ".zst" in blobs_in(store)


def test_format_v0(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_rootfs(tmp_path / "rootfs", big_size=CHUNK * 3)
    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="ocixfs"):
        build_image(f"dir:{root}", store=store, output=tmp_path / "i.ocix",
                    options=BuildOptions(format_version=0, chunk_size=CHUNK, progress=False,
                                         compress="zstd"))
    manifest = decode((tmp_path / "i.ocix").read_bytes())
    assert manifest.version == 0
    assert all(e.xattrs is None and e.chunks is None for e in manifest.entries.values())
    warnings = [r for r in caplog.records if "xattrs" in r.getMessage()]
    assert len(warnings) == 1
    assert "dropped those of 2 entries" in warnings[0].getMessage()  # /etc and /aping
    big = manifest.entries["/big.bin"]
    assert manifest_content(big, store) == (root / "big.bin").read_bytes()
    frame = blob_path(store, big.digest or b"").with_suffix(".zst").read_bytes()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == \
        (root / "big.bin").read_bytes()


def test_v0_large_file_from_a_layer(tmp_path: Path) -> None:
    content = os.urandom(3 * CHUNK + 1)
    (tmp_path / "r.tar").write_bytes(tar_bytes([file("big", content)], compression="gzip"))
    build_image(f"tar:{tmp_path / 'r.tar'}", store=tmp_path / "s", output=tmp_path / "i.ocix",
                options=BuildOptions(format_version=0, chunk_size=CHUNK, progress=False))
    entry = decode((tmp_path / "i.ocix").read_bytes()).entries["/big"]
    assert entry.chunks is None
    assert blob_path(tmp_path / "s", entry.digest or b"").read_bytes() == content


# -- BlobStore ----------------------------------------------------------------------------


def test_blob_store_put_once_and_repair_torn_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    chunk = store.put(b"content")
    assert store.put(b"content") == chunk
    assert blob_path(tmp_path, chunk.digest).read_bytes() == b"content"
    assert (store.stats().new_blobs, store.stats().existing_blobs) == (1, 0)
    blob_path(tmp_path, chunk.digest).write_bytes(b"cont")  # torn by a crash
    again = BlobStore(tmp_path)
    again.put(b"content")
    assert blob_path(tmp_path, chunk.digest).read_bytes() == b"content"
    assert again.stats().new_blobs == 1
    assert (blob_path(tmp_path, chunk.digest).stat().st_mode & 0o777) == 0o644 & ~_umask()


def test_blob_writer_streams_and_cleans_up(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, compress=True)
    with store.writer() as writer:
        writer.write(b"a" * 1000)
        writer.write(b"b" * 1000)
        chunk = writer.commit()
    assert chunk.digest == blake3.blake3(b"a" * 1000 + b"b" * 1000).digest()
    with store.writer() as writer:
        writer.write(b"abandoned")
    assert blobs_in(tmp_path) == {chunk.hex, chunk.hex + ".zst"}  # no temporary files left
    store.finish()
    assert store.contains(chunk.digest, chunk.size)
    assert not store.contains(chunk.digest, chunk.size + 1)


def test_blob_path_checks_digests(tmp_path: Path) -> None:
    digest = blake3.blake3(b"").digest()
    assert blob_path(tmp_path, digest) == blob_path(tmp_path, digest.hex())
    assert blob_path(tmp_path, digest) == tmp_path / "blobs" / "blake3" / digest.hex()
    for bad in (b"short", "../" + "0" * 61, digest.hex().upper()):
        with pytest.raises(ValueError):
            blob_path(tmp_path, bad)


def test_store_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot create"):
        BlobStore(tmp_path / "file" / "store")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ocix-store.json").write_text("[1]")
    with pytest.raises(StoreError, match="expected a JSON object"):
        BlobStore(tmp_path / "bad")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- progress -----------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_terminals() -> None:
    terminal, pipe = FakeTerminal(), io.StringIO()
    with Progress("building", total=2_000_000, stream=terminal, interval=0) as shown, \
            Progress("building", total=2_000_000, stream=pipe, interval=0) as hidden:
        for progress in (shown, hidden):
            progress.advance(500_000)
            progress.set_detail("layer 1/2")
    assert pipe.getvalue() == ""
    drawn = terminal.getvalue()
    assert "\r" in drawn and "25%" in drawn and "layer 1/2" in drawn
    assert drawn.endswith("\r")  # close() erased the line


def test_progress_line_contents() -> None:
    progress = Progress("extracting", total=None, enabled=False)
    progress.advance(1_500_000)
    line = progress.render(80)
    assert line == "extracting 1.50 MB"  # no rate yet: it would be noise
    assert len(Progress("x" * 200, enabled=False).render(40)) == 39
    assert format_bytes(999) == "999 B" and format_bytes(1_234_567) == "1.23 MB"
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"


def test_progress_bar_keeps_its_place_and_says_only_what_it_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11: the bar changed width as numbers changed, showed a dot at "100%" and an
    ``ETA 87:11:06`` in its first frame. The clock is the only thing faked here."""
    now = [1000.0]
    monkeypatch.setattr("ocixfs.progress.time.monotonic", lambda: now[0])
    progress = Progress("fetching", total=2_000_000, enabled=False)
    first = progress.render(100)
    assert "ETA" not in first and "/s" not in first  # no rate measured yet
    lines = []
    for done, at in ((1_000, 1000.01), (1_500_000, 1001.5), (498_000, 1002.0), (1_000, 1002.5)):
        now[0] = at
        progress._samples.append((at, progress.done))
        progress.advance(done)
        lines.append(progress.render(100))
    bars = [line.index("]") for line in [first, *lines]]
    assert len(set(bars)) == 1, lines  # the bar never moves
    assert " 99%" in lines[2] and "." in lines[2].split("]")[0]  # 1,999,000 of 2,000,000
    assert "100%" in lines[3] and "." not in lines[3].split("]")[0] and "ETA" not in lines[3]
    assert "ETA 0:0" in lines[1] and "MB/s" in lines[1]


# -- command line -------------------------------------------------------------------------


def test_cli_summary_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.tar").write_bytes(tar_bytes([file("a", b"a"), file("b", b"a"),
                                                file("c", b"", xattrs={"user.x": CAP_NET_RAW})]))
    args = [f"tar:{tmp_path / 'r.tar'}", "--store", str(tmp_path / "s"), "-o",
            str(tmp_path / "i.ocix"), "--chunk-size", "64K"]
    assert main(["build", *args]) == 0
    out = capsys.readouterr().out
    assert "regular files   3" in out and "new blobs       1" in out
    assert main(["build", *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entries"] == 3 and summary["regular_files"] == 3
    assert (summary["new_blobs"], summary["existing_blobs"]) == (0, 1)
    assert summary["content_bytes"] == 2
    assert decode((tmp_path / "i.ocix").read_bytes()).entries["/c"].kind is Kind.REGULAR


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.tar").write_bytes(tar_bytes([file("../x")]))
    args = ["--store", str(tmp_path / "s"), "-o", str(tmp_path / "i.ocix")]
    assert main(["build", f"tar:{tmp_path / 'r.tar'}", *args]) == 1
    assert capsys.readouterr().err == f"ocixfs: {tmp_path / 'r.tar'}: ../x: path ../x " \
                                      "escapes the root\n"
    assert main(["build", "tar:/nonexistent.tar", *args]) == 1
    assert capsys.readouterr().err == "ocixfs: /nonexistent.tar: no such file\n"
    assert main(["build", f"tar:{tmp_path / 'r.tar'}", *args, "--chunk-size", "1"]) == 2
    assert "chunk size must be between" in capsys.readouterr().err
    assert not (tmp_path / "i.ocix").exists()
