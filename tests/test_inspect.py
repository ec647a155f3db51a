"""``ocixfs inspect``: the listing, the summary, --json, and refusing bad manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ocixfs.cli import main
from ocixfs.cli.inspect import _load, summarize
from ocixfs.errors import FormatError
from ocixfs.image.format import Limits
from tests.formatvectors import V0_REFERENCE, V1_XATTRS_CHUNKS, load_vector


@pytest.fixture
def v0_image(tmp_path: Path) -> Path:
    path = tmp_path / "v0.ocix"
    path.write_bytes(load_vector("v0_reference"))
    return path


@pytest.fixture
def v1_image(tmp_path: Path) -> Path:
    path = tmp_path / "v1.ocix"
    path.write_bytes(load_vector("v1_xattrs_chunks"))
    return path


def test_listing_is_tar_like_in_tree_order(
    v0_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(v0_image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    paths = [line.split(" /", 1)[1].split(" ")[0] for line in lines[1:-1]]
    assert lines[0].split() == ["d---------", "0/0", "0", "-" * 16, "/"]  # cbormanifest root
    assert paths == ["bin", "dev", "dev/null", "dev/sda", "empty", "etc/x", "etc/xx", "fifo"]
    by_path = {line.split(" /", 1)[1].split(" ")[0]: line for line in lines[1:-1]}
    assert by_path["bin"].split() == [
        "lrwxrwxrwx", "0/0", "0", "2023-11-14", "22:13", "/bin", "->", "usr/bin"]
    assert by_path["dev/null"].split()[:3] == ["crw-rw-rw-", "0/0", "1,3"]
    assert by_path["dev/sda"].split()[:3] == ["brw-rw----", "0/disk", "8,0"]
    assert by_path["etc/x"].split() == [
        "-rwsr-xr-x", "user/0", "5", "2001-09-09", "01:46", "/etc/x"]
    # A hardlink shows its target's mode, owner and time, and "link to".
    assert by_path["etc/xx"].split() == [
        "hrwsr-xr-x", "user/0", "0", "2001-09-09", "01:46", "/etc/xx", "link", "to", "/etc/x"]
    assert by_path["fifo"].split()[:2] == ["prw-r--r--", "0/0"]
    assert lines[-1] == (
        "9 entries, 2 regular files, 5 bytes, 1 distinct blobs (5 bytes), 0 chunked files "
        "(OCIX version 0)"
    )


def test_summary_only(v1_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--summary", str(v1_image)]) == 0
    assert capsys.readouterr().out == (
        "2 entries, 1 regular files, 10 bytes, 2 distinct blobs (10 bytes), 1 chunked files "
        "(OCIX version 1)\n"
    )


def test_json(v1_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(v1_image)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["version"] == 1
    big, directory = document["entries"]
    assert big["path"] == "/big" and big["size"] == 10 and big["mode_string"] == "-rw-r--r--"
    assert [chunk["size"] for chunk in big["chunks"]] == [6, 4]
    assert big["xattrs"]["user.a"] == "010203"
    assert directory["btime"] == "1969-12-31T23:59:59.999999999Z"
    assert (directory["uid"], directory["gid"], directory["mode"]) == (5, 7, 0o1777)
    assert document["summary"]["chunked_files"] == 1
    assert document["summary"]["distinct_blobs"] == 2


def test_json_summary(v0_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", "--summary", str(v0_image)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "entries" not in document
    assert document["summary"]["hardlinks"] == 1


def test_summarize_counts() -> None:
    summary = summarize(V1_XATTRS_CHUNKS)
    assert (summary.entries, summary.regular_files, summary.total_bytes) == (2, 1, 10)
    assert summarize(V0_REFERENCE).hardlinks == 1


def test_bad_manifest_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ocix"
    # Rename the regular file /etc/x to /etc/y: the hardlink /etc/xx now names nothing.
    bad.write_bytes(load_vector("v0_reference").replace(b"\x66/etc/x\xa6", b"\x66/etc/y\xa6"))
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"ocixfs: {bad}: /etc/xx: hardlink target /etc/x does not exist\n"


def test_truncated_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cut.ocix"
    bad.write_bytes(load_vector("v0_reference")[:100])
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ocixfs: {bad}: ") and "unexpected end of data" in err
    assert err.count("\n") == 1


def test_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.ocix"
    assert main(["inspect", str(missing)]) == 2
    assert capsys.readouterr().err == f"ocixfs: {missing}: No such file or directory\n"


def test_reading_is_capped(v0_image: Path) -> None:
    with pytest.raises(FormatError, match="larger than the limit of 100 bytes"):
        _load(str(v0_image), Limits(max_bytes=100))
