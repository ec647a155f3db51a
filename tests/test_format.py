"""ocixfs.image.format: hand-written vectors, one test per validation rule, encoder and helpers.

Wire inputs for the rule tests are written with cbor2 (an independent CBOR encoder) in
canonical mode, or patched by hand where cbor2 cannot produce the malformed form.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import blake3
import cbor2
import pytest

from ocixfs.errors import FormatError
from ocixfs.image import format as fmt
from ocixfs.image.format import (
    DEFAULT_LIMITS,
    OCIX_TAG,
    Chunk,
    Entry,
    Kind,
    Limits,
    Manifest,
    check_path,
    decode,
    encode,
    format_time,
    join_path,
    manifest_digest,
    mode_string,
    parent,
    parse_time,
    path_sort_key,
    split_path,
)
from tests.formatvectors import (
    DIGITS,
    DIGITS_HEAD,
    DIGITS_TAIL,
    HELLO,
    V0_REFERENCE,
    V0_VARIANTS,
    V1_XATTRS_CHUNKS,
    load_vector,
    ns,
)

MODE = [[True, True, False], [True, False, False], [True, False, False], False, False, False]
HASH = bytes(range(32))


def wire(files: dict[str, Any], version: int = 0, **top: Any) -> bytes:
    """A manifest in canonical CBOR, written by cbor2."""
    document = {"version": version, "files": files, **top}
    return cbor2.dumps(cbor2.CBORTag(OCIX_TAG, document), canonical=True)


def regular(size: int = 1, digest: Any = HASH, **more: Any) -> dict[str, Any]:
    return {"mode": MODE, "type": "regularfile", "regularfile": [size, digest], **more}


def directory(**more: Any) -> dict[str, Any]:
    return {"mode": MODE, "type": "directory", "directory": [], **more}


def symlink(target: Any = "t", **more: Any) -> dict[str, Any]:
    return {"mode": MODE, "type": "symlink", "symlink": [target], **more}


def device(kind: str = "character", rdev: Any = (1, 3), **more: Any) -> dict[str, Any]:
    return {"mode": MODE, "type": kind, kind: list(rdev), **more}


def link(target: str = "/a", **more: Any) -> dict[str, Any]:
    return {"type": "link", "link": [target], **more}


def message_of(data: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(FormatError) as info:
        decode(data, limits=limits)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------
# Vectors


@pytest.mark.parametrize(
    ("name", "model"),
    [("v0_reference", V0_REFERENCE), ("v1_xattrs_chunks", V1_XATTRS_CHUNKS)],
)
def test_vector_decodes_to_model_and_model_encodes_to_vector(name: str, model: Manifest) -> None:
    data = load_vector(name)
    decoded = decode(data, source=name)
    assert decoded == model
    assert list(decoded.entries) == list(model.entries)  # canonical order is kept
    assert encode(model) == data


def test_vector_of_accepted_spellings_decodes() -> None:
    """Tag 0 text with an offset, tag 1 int and float, fifo spelled "block", unknown keys."""
    data = load_vector("v0_variants")
    assert decode(data) == V0_VARIANTS
    # The model keeps instants: re-encoding normalises the times to UTC text.
    assert decode(encode(V0_VARIANTS)) == V0_VARIANTS


def test_vector_hashes_are_real_blake3() -> None:
    assert blake3.blake3(b"hello").digest() == HELLO
    assert blake3.blake3(b"0123456789").digest() == DIGITS
    assert blake3.blake3(b"012345").digest() == DIGITS_HEAD
    assert blake3.blake3(b"6789").digest() == DIGITS_TAIL


def test_encode_is_independent_of_entry_order() -> None:
    items = list(V0_REFERENCE.entries.items())
    random.Random(7).shuffle(items)
    assert encode(Manifest(0, dict(items))) == load_vector("v0_reference")


def test_uid_and_gid_are_written_only_when_present() -> None:
    absent = encode(Manifest(0, {"/a": Entry(Kind.FIFO, mode=0o644)}))
    zero = encode(Manifest(0, {"/a": Entry(Kind.FIFO, mode=0o644, uid=0, gid=0)}))
    assert b"cuid" not in absent and b"cgid" not in absent
    assert b"cuid\x00" in zero and b"cgid\x00" in zero
    assert decode(zero).entries["/a"].uid == 0
    assert decode(absent).entries["/a"].uid is None


def test_cbor2_agrees_the_encoding_is_canonical() -> None:
    data = encode(V1_XATTRS_CHUNKS)
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


def test_manifest_digest() -> None:
    assert manifest_digest(b"hello") == "b3:" + HELLO.hex()


# ---------------------------------------------------------------------------------------
# Decoding: one case per rule, with the message


def _patched(files: dict[str, Any], old: bytes, new: bytes, version: int = 0) -> bytes:
    data = wire(files, version)
    assert data.count(old) == 1
    return data.replace(old, new)


TAG = cbor2.dumps(cbor2.CBORTag(OCIX_TAG, None))[:-1]
DEEP: Any = [1]
for _ in range(20):
    DEEP = [DEEP]

RULES = [
    # CBOR and the top level
    pytest.param(cbor2.dumps({"version": 0, "files": {}}), "manifest: not an OCIX manifest",
                 id="untagged"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(55799, {})), "not an OCIX manifest", id="other-tag"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, [])), "the tagged item is not a map",
                 id="top-not-map"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"version": 0})), "no 'files' map",
                 id="no-files"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"files": {}})), "no 'version'",
                 id="no-version"),
    pytest.param(wire({}, version=2), "manifest: unsupported version 2", id="version-2"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"files": {}, "version": -1})),
                 "version is not an unsigned integer", id="version-negative"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"files": [], "version": 0})),
                 "'files' is not a map", id="files-not-map"),
    pytest.param(wire({"/a": directory()}) + b"\x00", "1 bytes after the manifest",
                 id="trailing"),
    pytest.param(wire({"/a": directory()})[:-1], "unexpected end of data", id="truncated"),
    pytest.param(b"", "unexpected end of data", id="empty"),
    pytest.param(_patched({"/a": symlink("zq")}, b"\x62zq", b"\x7f\x62zq\xff"),
                 "/a: indefinite-length item", id="indefinite"),
    pytest.param(_patched({"/a": directory(uid=5)}, b"cuid\x05", b"cuid\x18\x05"),
                 "/a: integer or length not in shortest form", id="long-int"),
    pytest.param(_patched({"/a": symlink("zq")}, b"\x62zq", b"\x78\x02zq"),
                 "/a: integer or length not in shortest form", id="long-length"),
    pytest.param(_patched({"/a": directory(uid=5, gid=6)}, b"cuid\x05", b"cgid\x05"),
                 "/a: duplicate map key", id="duplicate-key"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"files": {"/a": {
        "type": "directory", "mode": MODE, "directory": []}}, "version": 0})),
        "/a: map keys not in canonical order", id="unsorted-entry-keys"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"files": {
        "/b": directory(), "/a": directory()}, "version": 0})),
        "map keys not in canonical order", id="unsorted-paths"),
    pytest.param(cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"version": 0, "files": {}})),
                 "map keys not in canonical order", id="unsorted-top"),
    pytest.param(wire({"/a": directory(zzz=cbor2.CBORTag(2, b"\x01"))}),
                 "/a: tag 2 is not allowed here", id="tag-in-unknown-key"),
    pytest.param(wire({"/a": directory(zzz=cbor2.CBORTag(OCIX_TAG, {}))}),
                 "/a: tag 1868786040 is not allowed here", id="nested-ocix-tag"),
    pytest.param(wire({"/a": directory(mtime=cbor2.CBORTag(37, b"x" * 16))}),
                 "/a: tag 37 is not allowed on mtime", id="tag-37-on-time"),
    pytest.param(wire({"/a": directory(zzz=DEEP)}), "/a: nested deeper than 16",
                 id="too-deep"),
    pytest.param(_patched({"/a": symlink("zq")}, b"zq", b"z\xff"),
                 "/a: text is not valid UTF-8", id="bad-utf8"),
    pytest.param(_patched({"/\u00e9": directory()}, "/\u00e9".encode(), b"/\xed\xa0\x80"[:3]),
                 "text is not valid UTF-8", id="surrogate-path"),
    pytest.param(_patched({"/a": directory(zzz=1.5)}, b"\xf9\x3e\x00", b"\xfb\x3f\xf8" + bytes(6)),
                 "/a: float not in shortest form", id="long-float"),
    pytest.param(_patched({"/a": directory(zzz=1.5)}, b"\xf9\x3e\x00", b"\xfa\x7f\xc0\x00\x00"),
                 "/a: NaN not encoded as f97e00", id="long-nan"),
    pytest.param(_patched({"/a": directory(zzz=1.5)}, b"\xf9\x3e\x00", b"\xf8\x10"),
                 "/a: malformed CBOR", id="bad-simple-value"),
    pytest.param(_patched({"/a": directory(zzz=1.5)}, b"\xf9\x3e\x00", b"\x1c"),
                 "/a: malformed CBOR", id="reserved-info"),
    # entries
    pytest.param(wire({"/a": [1]}), "/a: entry is not a map", id="entry-not-map"),
    pytest.param(wire({"/a": {**directory(), 1: 2}}), "/a: map key is not text",
                 id="non-text-key"),
    pytest.param(wire({"/a": {"mode": MODE, "directory": []}}), "/a: no 'type'", id="no-type"),
    pytest.param(wire({"/a": {**directory(), "type": "socket"}}), "/a: unknown type 'socket'",
                 id="unknown-type"),
    pytest.param(wire({"/a": {"mode": MODE, "type": "directory"}}),
                 "/a: type directory without its 'directory' content", id="no-content"),
    pytest.param(wire({"/a": {"mode": MODE, "type": "directory", "regularfile": [0]}}),
                 "/a: 'regularfile' content does not match type directory", id="wrong-content"),
    pytest.param(wire({"/a": {**directory(), "fifo": []}}),
                 "/a: two content keys, 'fifo' and 'directory'", id="two-contents"),
    pytest.param(wire({"/a": {**directory(), "mode": MODE[:5]}}), "/a: mode is not [[r,w,x]",
                 id="mode-short"),
    pytest.param(wire({"/a": {**directory(), "mode": [[1, 1, 1]] * 3 + [0, 0, 0]}}),
                 "/a: mode is not", id="mode-ints"),
    pytest.param(wire({"/a": {**directory(), "mode": 0o755}}), "/a: mode is not",
                 id="mode-number"),
    pytest.param(wire({"/a": {"type": "directory", "directory": []}}), "/a: no mode",
                 id="mode-missing"),
    pytest.param(wire({"/a": directory(uid=-1)}), "/a: uid is not an unsigned integer",
                 id="uid-negative"),
    pytest.param(wire({"/a": directory(gid=2**32)}), "/a: gid 4294967296 is not an unsigned 32",
                 id="gid-too-big"),
    pytest.param(wire({"/a": directory(username=5)}), "/a: username is not text",
                 id="username-not-text"),
    pytest.param(wire({"/a": directory(groupname="g" * 256)}),
                 "/a: groupname is not text of at most 255 bytes", id="groupname-long"),
    # times
    pytest.param(wire({"/a": directory(mtime="yesterday")}),
                 "/a: mtime: yesterday is not RFC 3339 time", id="time-text"),
    pytest.param(wire({"/a": directory(atime="2023-02-30T00:00:00Z")}),
                 "/a: atime: 2023-02-30T00:00:00Z is not a valid date", id="time-date"),
    pytest.param(wire({"/a": directory(ctime="2023-01-01T24:00:00Z")}),
                 "is not a valid time of day", id="time-hour"),
    pytest.param(wire({"/a": directory(mtime="2016-12-31T23:59:60Z")}),
                 "is not a valid time of day", id="time-leap-second"),
    pytest.param(wire({"/a": directory(mtime="2023-01-01T00:00:00.1234567891Z")}),
                 "is not RFC 3339 time", id="time-too-precise"),
    pytest.param(wire({"/a": directory(mtime="2023-01-01T00:00:00+24:00")}),
                 "has an invalid UTC offset", id="time-offset"),
    pytest.param(wire({"/a": directory(btime="0001-01-01T00:00:00+00:01")}),
                 "is outside the years 0001-9999", id="time-before-year-1"),
    pytest.param(wire({"/a": directory(mtime=cbor2.CBORTag(1, 2**40))}),
                 "/a: time 1099511627776000000000 is not within the years", id="epoch-too-big"),
    pytest.param(wire({"/a": directory(mtime=1700000000)}),
                 "/a: mtime is not RFC 3339 text or a tag 1 epoch time", id="time-untagged-int"),
    pytest.param(wire({"/a": directory(mtime=cbor2.CBORTag(0, 5))}),
                 "/a: tag 0 on mtime does not hold text", id="tag0-int"),
    pytest.param(wire({"/a": directory(mtime=cbor2.CBORTag(1, "2023-01-01T00:00:00Z"))}),
                 "/a: tag 1 on mtime does not hold a number", id="tag1-text"),
    pytest.param(wire({"/a": directory(mtime=cbor2.CBORTag(1, float("inf")))}),
                 "/a: mtime is not a finite number", id="tag1-infinite"),
    # regular files and chunks
    pytest.param(wire({"/a": {**regular(), "regularfile": []}}),
                 "/a: regularfile is not [size, b3-256, chunks]", id="regular-empty"),
    pytest.param(wire({"/a": regular(size=-1)}), "/a: file size is not an unsigned integer",
                 id="size-negative"),
    pytest.param(wire({"/a": regular(digest=HASH[:31])}), "/a: b3-256 hash is 31 bytes, not 32",
                 id="hash-short"),
    pytest.param(wire({"/a": regular(digest=HASH.hex())}), "/a: b3-256 hash is not a byte string",
                 id="hash-text"),
    pytest.param(wire({"/a": {**regular(), "regularfile": [5]}}),
                 "/a: no b3-256 hash (only an empty file may omit it)", id="hash-missing"),
    pytest.param(wire({"/a": regular(size=2**51)}), "/a: file size 2251799813685248 is not within",
                 id="size-limit"),
    pytest.param(wire({"/a": {**regular(10), "regularfile": [10, HASH, [[6, HASH], [3, HASH]]]}},
                      version=1),
                 "/a: chunk sizes add up to 9, not the file size 10", id="chunk-sum"),
    pytest.param(wire({"/a": {**regular(6), "regularfile": [6, HASH, [[6, HASH], [0, HASH]]]}},
                      version=1),
                 "/a: a chunk is not [size > 0, 32-byte b3-256]", id="chunk-zero"),
    pytest.param(wire({"/a": {**regular(6), "regularfile": [6, HASH, [[6, HASH[:8]]]]}},
                      version=1),
                 "/a: a chunk is not [size > 0, 32-byte b3-256]", id="chunk-hash"),
    pytest.param(wire({"/a": {**regular(6), "regularfile": [6, HASH, [[6]]]}}, version=1),
                 "/a: chunk is not [size, b3-256]", id="chunk-shape"),
    pytest.param(wire({"/a": {**regular(6), "regularfile": [6, HASH, []]}}, version=1),
                 "/a: chunk list is empty", id="chunks-empty"),
    pytest.param(wire({"/a": {**regular(6), "regularfile": [6, HASH, [[6, HASH]]]}}),
                 "/a: chunk lists need version 1", id="chunks-v0"),
    pytest.param(wire({"/a": {**regular(6), "regularfile": [6, HASH, {"x": 1}]}}, version=1),
                 "/a: chunk list is not an array", id="chunks-not-array"),
    # other kinds
    pytest.param(wire({"/a": {**directory(), "directory": [1]}}), "/a: directory is not []",
                 id="directory-content"),
    pytest.param(wire({"/a": {"mode": MODE, "type": "fifo", "block": [1, 2]}}),
                 "/a: block is not []", id="fifo-block-content"),
    pytest.param(wire({"/a": symlink("")}),
                 "/a: symlink target is empty, not text, or contains NUL", id="symlink-empty"),
    pytest.param(wire({"/a": symlink("x\0y")}), "/a: symlink target is empty", id="symlink-nul"),
    pytest.param(wire({"/a": {**symlink(), "symlink": []}}), "/a: symlink is not [target]",
                 id="symlink-shape"),
    pytest.param(wire({"/a": symlink(5)}), "/a: symlink target is not text", id="symlink-type"),
    pytest.param(wire({"/a": device(rdev=(1,))}), "/a: character is not [major, minor]",
                 id="device-shape"),
    pytest.param(wire({"/a": device("block", rdev=())}), "/a: block is not [major, minor]",
                 id="block-empty"),
    pytest.param(wire({"/a": device(rdev=(4096, 0))}),
                 "/a: device (4096, 0) is not (major <= 4095, minor <= 1048575)", id="major-big"),
    pytest.param(wire({"/a": device("block", rdev=(8, 2**20))}),
                 "/a: device (8, 1048576) is not", id="minor-big"),
    pytest.param(wire({"/a": device(rdev=(-1, 0))}), "/a: device major is not an unsigned",
                 id="major-negative"),
    # hardlinks
    pytest.param(wire({"/b": link("/nope")}), "manifest: /b: hardlink target /nope does not exist",
                 id="link-missing"),
    pytest.param(wire({"/a": directory(), "/b": link("/a")}),
                 "manifest: /b: hardlink target /a is not a regular file", id="link-to-dir"),
    pytest.param(wire({"/a": symlink(), "/b": link("/a")}),
                 "/b: hardlink target /a is not a regular file", id="link-to-symlink"),
    pytest.param(wire({"/a": regular(), "/b": link("/a"), "/c": link("/b")}),
                 "/c: hardlink target /b is not a regular file", id="link-to-link"),
    pytest.param(wire({"/a": link("/a")}), "/a: hardlink target /a is not a regular file",
                 id="link-cycle"),
    pytest.param(wire({"/a": link("/bb"), "/bb": regular()}),
                 "/a: hardlink target /bb must be the file's lowest name", id="link-order"),
    pytest.param(wire({"/a": regular(), "/b": link("/a", mode=MODE)}),
                 "/b: a hardlink carries no metadata, but this one has mode", id="link-mode"),
    pytest.param(wire({"/a": regular(), "/b": link("/a", mtime="2020-01-01T00:00:00Z")}),
                 "/b: a hardlink carries no metadata, but this one has mtime", id="link-mtime"),
    pytest.param(wire({"/a": regular(), "/b": link("a")}),
                 "/b: hardlink target a: not a canonical absolute path", id="link-relative"),
    # paths and the tree
    pytest.param(wire({"a": directory()}), "manifest: a: not a canonical absolute path",
                 id="path-relative"),
    pytest.param(wire({"": directory()}), "not a canonical absolute path", id="path-empty"),
    pytest.param(wire({"/a/": directory()}), "/a/: not a canonical", id="path-trailing-slash"),
    pytest.param(wire({"//a": directory()}), "//a: not a canonical", id="path-empty-name"),
    pytest.param(wire({"/a/./b": directory()}), "/a/./b: not a canonical", id="path-dot"),
    pytest.param(wire({"/a/..": directory()}), "/a/..: not a canonical", id="path-dotdot"),
    pytest.param(wire({"/a\0b": directory()}), r"/a\x00b: not a canonical", id="path-nul"),
    pytest.param(wire({"/a\nb": regular(digest=b"")}), r"manifest: /a\nb: b3-256 hash",
                 id="path-newline-escaped"),
    pytest.param(wire({"/" + "x" * 256: directory()}), "a name longer than 255 bytes",
                 id="name-long"),
    pytest.param(wire({"/" + "\u00e9" * 128: directory()}), "a name longer than 255 bytes",
                 id="name-long-utf8"),
    pytest.param(wire({"/" + "/".join(["x" * 200] * 21): directory()}),
                 "path longer than 4096 bytes", id="path-long"),
    pytest.param(wire({"/": regular()}), "manifest: /: the root is a regularfile, not a directory",
                 id="root-not-dir"),
    pytest.param(wire({"/a": regular(), "/a/b": directory()}),
                 "manifest: /a/b: /a is a regularfile, not a directory", id="file-parent"),
    pytest.param(wire({"/a": symlink(), "/a/b/c": directory()}),
                 "/a/b/c: /a is a symlink, not a directory", id="symlink-ancestor"),
    # xattrs
    pytest.param(wire({"/a": directory(xattrs={"user.a": b"1"})}), "/a: xattrs need version 1",
                 id="xattrs-v0"),
    pytest.param(wire({"/a": directory(xattrs={})}, version=1), "/a: xattrs is empty",
                 id="xattrs-empty"),
    pytest.param(wire({"/a": directory(xattrs={"": b"1"})}, version=1),
                 "/a: xattr name '' is not 1-255 bytes", id="xattr-name-empty"),
    pytest.param(wire({"/a": directory(xattrs={"a\0b": b"1"})}, version=1),
                 r"/a: xattr name 'a\x00b' is not", id="xattr-name-nul"),
    pytest.param(wire({"/a": directory(xattrs={"user.a": "text"})}, version=1),
                 "/a: xattr 'user.a' is not a byte string", id="xattr-value-text"),
    pytest.param(wire({"/a": directory(xattrs={1: b"x"})}, version=1),
                 "/a: map key is not text", id="xattr-name-int"),
    pytest.param(wire({"/a": directory(xattrs={"user.a": bytes(65536)})}, version=1),
                 "/a: xattrs total 65542 bytes, over the limit of 65536", id="xattrs-big"),
    pytest.param(wire({"/a": directory(xattrs=[1])}, version=1),
                 "/a: xattrs is not a map of text to bytes", id="xattrs-not-map"),
]


@pytest.mark.parametrize(("data", "expected"), RULES)
def test_rule(data: bytes, expected: str) -> None:
    assert expected in message_of(data)


@pytest.mark.parametrize(
    ("limits", "data", "expected"),
    [
        pytest.param(Limits(max_bytes=10), wire({}), "manifest: 22 bytes exceed the limit of 10",
                     id="bytes"),
        pytest.param(Limits(max_entries=1), wire({"/a": directory(), "/b": directory()}),
                     "manifest: 2 entries exceed the limit of 1", id="entries"),
        pytest.param(Limits(max_path_bytes=5), wire({"/abcdef": directory()}),
                     "/abcdef: path longer than 5 bytes", id="path"),
        pytest.param(Limits(max_name_bytes=3), wire({"/abc/defg": directory()}),
                     "/abc/defg: a name longer than 3 bytes", id="name"),
        pytest.param(Limits(max_symlink_bytes=3), wire({"/a": symlink("abcd")}),
                     "/a: symlink target longer than 3 bytes", id="symlink"),
        pytest.param(Limits(max_xattrs_bytes=8),
                     wire({"/a": directory(xattrs={"user.a": b"123"})}, version=1),
                     "/a: xattrs total 9 bytes, over the limit of 8", id="xattrs"),
        pytest.param(Limits(max_chunks=1),
                     wire({"/a": {**regular(), "regularfile": [2, HASH, [[1, HASH], [1, HASH]]]}},
                          version=1),
                     "/a: 2 chunks exceed the limit of 1", id="chunks"),
        pytest.param(Limits(max_file_size=10), wire({"/a": regular(11)}),
                     "/a: file size 11 is not within 0..10", id="file-size"),
        pytest.param(Limits(max_depth=3), wire({"/a": directory(zzz=[1])}),
                     "/a: nested deeper than 3", id="depth"),
    ],
)
def test_limit(limits: Limits, data: bytes, expected: str) -> None:
    assert expected in message_of(data, limits)


def test_entry_count_is_capped_from_the_map_header_before_decoding_entries() -> None:
    # A header claiming a million entries, followed by garbage that would fail if read.
    data = TAG + b"\xa2\x65files\xba\x00\x0f\x42\x40" + b"\xff" * 64
    assert "1000000 entries exceed the limit of 10" in message_of(data, Limits(max_entries=10))
    huge = TAG + b"\xa2\x65files\xbb" + b"\xff" * 8
    assert "entries exceed the limit of 4000000" in message_of(huge)


def test_source_prefixes_messages() -> None:
    with pytest.raises(FormatError, match=r"^manifest\.ocix: /b: hardlink target /nope does not"):
        decode(wire({"/b": link("/nope")}), source="manifest.ocix")


def test_unknown_keys_are_ignored() -> None:
    data = wire({"/a": directory(zzz={"k": [1, -2, b"x", "y", None, True, 1.5]}, aaaaaaaaaaaa=0)},
                future="yes")
    assert decode(data) == Manifest(0, {"/a": Entry(Kind.DIRECTORY, mode=0o644)})


def test_tagged_and_offset_times_decode_to_instants() -> None:
    data = wire({"/a": directory(
        atime=cbor2.CBORTag(1, -1),
        btime=cbor2.CBORTag(1, 0.25),
        ctime=cbor2.CBORTag(0, "1970-01-01t01:00:00.000000001+01:00"),
        mtime="1969-12-31T23:00:00z",
    )})
    entry = decode(data).entries["/a"]
    assert (entry.atime, entry.btime, entry.ctime, entry.mtime) == (
        -(10**9), 250_000_000, 1, -3600 * 10**9,
    )


def test_empty_manifest_and_implicit_root() -> None:
    assert decode(wire({})) == Manifest(0, {})
    empty_file = {**regular(), "regularfile": [0]}
    assert decode(wire({"/a/b/c": empty_file})).entries.keys() == {"/a/b/c"}


def test_empty_regular_file_may_carry_the_hash_of_nothing() -> None:
    empty = blake3.blake3(b"").digest()
    entry = decode(wire({"/a": regular(0, digest=empty)})).entries["/a"]
    assert (entry.size, entry.digest, entry.blobs) == (0, empty, ())


# ---------------------------------------------------------------------------------------
# Encoding


def _encode_error(entries: dict[str, Any], version: int = 1) -> str:
    with pytest.raises(FormatError) as info:
        encode(Manifest(version, entries))
    return str(info.value)


REGULAR = Entry(Kind.REGULAR, mode=0o644, size=1, digest=HASH)


@pytest.mark.parametrize(
    ("entries", "version", "expected"),
    [
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o644, xattrs={"user.a": b""})}, 0,
                     "manifest: /a: xattrs need version 1", id="xattrs-v0"),
        pytest.param({"/a": dataclasses.replace(REGULAR, chunks=(Chunk(1, HASH),))}, 0,
                     "manifest: /a: chunk lists need version 1", id="chunks-v0"),
        pytest.param({"/a": Entry(Kind.REGULAR, mode=0o644, size=5)}, 1,
                     "/a: no b3-256 hash", id="no-hash"),
        pytest.param({"/a": Entry(Kind.REGULAR, mode=0o644, size=0, chunks=(Chunk(1, HASH),))},
                     1, "/a: a chunked file needs its whole-file hash too", id="chunks-no-whole"),
        pytest.param({"/a": dataclasses.replace(REGULAR, chunks=(Chunk(2, HASH),))}, 1,
                     "/a: chunk sizes add up to 2, not the file size 1", id="chunks-sum"),
        pytest.param({"/a": Entry(Kind.REGULAR, mode=0o644, size=1, digest=None,
                                  chunks=(Chunk(1, HASH),))}, 1,
                     "/a: no b3-256 hash", id="chunks-no-hash"),
        pytest.param({"/a": dataclasses.replace(REGULAR, chunks=[Chunk(1, HASH)])}, 1,
                     "/a: chunk list is empty or not a tuple", id="chunks-list"),
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o644, size=3)}, 1,
                     "/a: a directory entry cannot have size", id="dir-size"),
        pytest.param({"/a": Entry(Kind.SYMLINK, mode=0o644, target="x", rdev=(1, 1))}, 1,
                     "/a: a symlink entry cannot have rdev", id="symlink-rdev"),
        pytest.param({"/a": Entry(Kind.FIFO, mode=0o644, digest=HASH)}, 1,
                     "/a: a fifo entry cannot have digest", id="fifo-digest"),
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o10000)}, 1,
                     "/a: mode 4096 is not 0..0o7777", id="mode-range"),
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o755, uid=True)}, 1,
                     "/a: uid True is not an unsigned 32-bit integer", id="uid-bool"),
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o755, mtime=1.5)}, 1,  # type: ignore[arg-type]
                     "/a: time 1.5 is not within", id="time-float"),
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o755, mtime=10**30)}, 1,
                     "is not within the years 0001-9999", id="time-range"),
        pytest.param({"/a": Entry(Kind.CHARACTER, mode=0o600, rdev=[1, 3])}, 1,  # type: ignore[arg-type]
                     "/a: device [1, 3] is not", id="rdev-list"),
        pytest.param({"/a": Entry(Kind.DIRECTORY, mode=0o755, xattrs={"n": "v"})}, 1,  # type: ignore[dict-item]
                     "/a: xattr 'n' value is not bytes", id="xattr-text"),
        pytest.param({"/a\udcff": Entry(Kind.DIRECTORY, mode=0o755)}, 1,
                     "text is not valid Unicode", id="surrogate"),
        pytest.param({"/a": "nope"}, 1, "manifest: /a: not an Entry", id="not-entry"),
        pytest.param({"/a": Entry(Kind.REGULAR, mode=0o644, size=1, digest=HASH),
                      "/b": Entry(Kind.HARDLINK, target="/a", uid=0)}, 1,
                     "/b: a hardlink carries no metadata, but this one has uid", id="link-uid"),
        pytest.param({"/bb": Entry(Kind.REGULAR, mode=0o644, size=1, digest=HASH),
                      "/a": Entry(Kind.HARDLINK, target="/bb")}, 1,
                     "/a: hardlink target /bb must be the file's lowest name", id="link-order"),
    ],
)
def test_encode_refuses_invalid_models(
    entries: dict[str, Any], version: int, expected: str
) -> None:
    assert expected in _encode_error(entries, version)


def test_encode_refuses_bad_versions_and_types() -> None:
    with pytest.raises(FormatError, match="unsupported version 7"):
        encode(Manifest(7, {}))
    with pytest.raises(FormatError, match="not a Manifest"):
        encode({"/": Entry(Kind.DIRECTORY, mode=0)})  # type: ignore[arg-type]


def test_encode_writes_go_rfc3339nano_utc_times() -> None:
    data = encode(Manifest(0, {"/a": Entry(Kind.FIFO, mode=0, mtime=ns(2020, 1, 2, 3, 4, 5,
                                                                       nanosecond=120_000_000))}))
    assert b"\x77" + b"2020-01-02T03:04:05.12Z" in data


def test_entry_shortcut_matches_the_dataclass() -> None:
    # decode builds entries without Entry.__init__; it must track Entry's fields.
    spec = [(item.name, item.default) for item in dataclasses.fields(Entry)]
    shortcut = fmt._new_entry.__code__.co_varnames[: fmt._new_entry.__code__.co_argcount]
    assert [name for name, _ in spec] == list(shortcut)
    assert fmt._new_entry(Kind.FIFO) == Entry(Kind.FIFO)
    values = {"mode": 1, "uid": 2, "size": 3, "target": "t", "rdev": (1, 2)}
    assert fmt._new_entry(Kind.FIFO, **values) == Entry(Kind.FIFO, **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize(
    ("path", "parent_path", "parts"),
    [("/", "/", ()), ("/a", "/", ("a",)), ("/a/b c/d", "/a/b c", ("a", "b c", "d"))],
)
def test_path_helpers(path: str, parent_path: str, parts: tuple[str, ...]) -> None:
    assert parent(path) == parent_path
    assert split_path(path) == parts
    if parts:
        assert join_path(parent_path, parts[-1]) == path
    check_path(path)


def test_check_path_raises_format_error() -> None:
    with pytest.raises(FormatError, match=r"^path: /a/\.\.: not a canonical absolute path$"):
        check_path("/a/..")


def test_path_sort_key_is_length_then_bytes() -> None:
    paths = ["/b", "/aa", "/\u00e9", "/a", "/zz/z"]
    assert sorted(paths, key=path_sort_key) == ["/a", "/b", "/aa", "/\u00e9", "/zz/z"]


@pytest.mark.parametrize(
    ("kind", "mode", "expected"),
    [
        (Kind.DIRECTORY, 0o755, "drwxr-xr-x"),
        (Kind.REGULAR, 0o644, "-rw-r--r--"),
        (Kind.REGULAR, 0o4755, "-rwsr-xr-x"),
        (Kind.REGULAR, 0o4644, "-rwSr--r--"),
        (Kind.REGULAR, 0o2755, "-rwxr-sr-x"),
        (Kind.REGULAR, 0o2745, "-rwxr-Sr-x"),
        (Kind.DIRECTORY, 0o1777, "drwxrwxrwt"),
        (Kind.DIRECTORY, 0o1770, "drwxrwx--T"),
        (Kind.SYMLINK, 0o777, "lrwxrwxrwx"),
        (Kind.CHARACTER, 0o666, "crw-rw-rw-"),
        (Kind.BLOCK, 0o660, "brw-rw----"),
        (Kind.FIFO, 0o600, "prw-------"),
        (Kind.HARDLINK, None, "h---------"),
    ],
)
def test_mode_string(kind: Kind, mode: int | None, expected: str) -> None:
    assert mode_string(Entry(kind, mode=mode)) == expected


def test_mode_string_override_for_hardlinks() -> None:
    assert mode_string(Entry(Kind.HARDLINK, target="/a"), 0o755) == "hrwxr-xr-x"


@pytest.mark.parametrize(
    ("instant", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:00.000000001Z"),
        (-1, "1969-12-31T23:59:59.999999999Z"),
        (1_700_000_000_100_000_000, "2023-11-14T22:13:20.1Z"),
        (fmt.MIN_TIME_NS, "0001-01-01T00:00:00Z"),
        (fmt.MAX_TIME_NS, "9999-12-31T23:59:59.999999999Z"),
    ],
)
def test_format_and_parse_time(instant: int, text: str) -> None:
    assert format_time(instant) == text
    assert parse_time(text) == instant


def test_time_limits_and_offsets() -> None:
    assert parse_time("2020-01-01T00:00:00-00:30") == ns(2020, 1, 1, 0, 30)
    with pytest.raises(FormatError, match="outside the years"):
        format_time(fmt.MAX_TIME_NS + 1)
    with pytest.raises(FormatError, match="^time: 2020-01-01 is not RFC 3339 time$"):
        parse_time("2020-01-01")


def test_every_mode_encoding_decodes_and_nothing_else_does() -> None:
    encodings, _ = fmt._mode_tables()  # the encoder's table of all 4096 modes
    codes = fmt._ModeCodes()
    assert [codes[encoded] for encoded in encodings] == list(range(0o10000))
    rng = random.Random(7)
    for encoded in rng.sample(encodings, 64):
        spot = rng.randrange(len(encoded))
        broken = encoded[:spot] + bytes([encoded[spot] ^ 0x02]) + encoded[spot + 1 :]
        assert codes[broken] is None  # true/false made null or undefined, or a bad head
        assert codes[encoded[:-1]] is None
    assert len(codes) == 0o10000  # refused encodings are not remembered
