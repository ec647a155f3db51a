"""Property tests for ocixfs.image.format: round trips on generated trees, and hostile input.

Hostile input (random bytes, mutated manifests, random CBOR in every field) may only ever
give ``FormatError`` or a manifest that is itself valid, and the decoder's fast path for
common entries must give exactly what its general reader gives: the same manifest or the
same error (every fuzz test here decodes both ways).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocixfs.errors import FormatError
from ocixfs.image import format as fmt
from ocixfs.image.format import (
    MAX_DEVICE_MAJOR,
    MAX_DEVICE_MINOR,
    MAX_TIME_NS,
    MIN_TIME_NS,
    OCIX_TAG,
    Chunk,
    Entry,
    Kind,
    Limits,
    Manifest,
    decode,
    encode,
    format_time,
    parent,
    parse_time,
    path_sort_key,
)

# Modest example counts: CI time matters more than depth here (fuzz longer by raising them).
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.text(st.sampled_from("ab.-_ \u00e9\u4e00\n"), min_size=1, max_size=5).filter(
    lambda name: name not in (".", "..")
)
TIMES = st.none() | st.integers(MIN_TIME_NS, MAX_TIME_NS) | st.integers(0, 2**31) .map(
    lambda seconds: seconds * 10**9
)
IDS = st.none() | st.integers(0, 2**32 - 1) | st.just(0)
DIGESTS = st.binary(min_size=32, max_size=32)
LEAF_KINDS = [Kind.REGULAR, Kind.REGULAR, Kind.SYMLINK, Kind.HARDLINK, Kind.CHARACTER,
              Kind.BLOCK, Kind.FIFO, Kind.DIRECTORY]


@st.composite
def xattrs(draw: st.DrawFn, version: int) -> dict[str, bytes] | None:
    if version < 1 or draw(st.booleans()):
        return None
    names = st.text(min_size=1, max_size=12).filter(lambda name: "\0" not in name)
    return draw(st.dictionaries(names, st.binary(max_size=8), min_size=1, max_size=3))


@st.composite
def entries(draw: st.DrawFn, kind: Kind, version: int, targets: list[str]) -> Entry:
    if kind is Kind.HARDLINK:
        return Entry(Kind.HARDLINK, target=draw(st.sampled_from(targets)))
    content: dict[str, Any] = {}
    if kind is Kind.REGULAR:
        if version >= 1 and draw(st.booleans()):
            sizes = draw(st.lists(st.integers(1, 2**20), min_size=1, max_size=4))
            chunks = tuple(Chunk(size, draw(DIGESTS)) for size in sizes)
            content = {"size": sum(sizes), "digest": draw(DIGESTS), "chunks": chunks}
        else:
            size = draw(st.integers(0, 2**45) | st.just(0))
            digest = draw(st.none() | DIGESTS) if size == 0 else draw(DIGESTS)
            content = {"size": size, "digest": digest}
    elif kind is Kind.SYMLINK:
        content = {"target": draw(st.text(min_size=1, max_size=20).filter(lambda t: "\0" not in t))}
    elif kind in (Kind.CHARACTER, Kind.BLOCK):
        content = {"rdev": (draw(st.integers(0, MAX_DEVICE_MAJOR)),
                            draw(st.integers(0, MAX_DEVICE_MINOR)))}
    return Entry(
        kind,
        mode=draw(st.integers(0, 0o7777)),
        uid=draw(IDS),
        gid=draw(IDS),
        username=draw(st.none() | st.text(max_size=8)),
        groupname=draw(st.none() | st.text(max_size=8)),
        atime=draw(TIMES),
        btime=draw(TIMES),
        ctime=draw(TIMES),
        mtime=draw(TIMES),
        xattrs=draw(xattrs(version)),
        **content,
    )


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    version = draw(st.sampled_from((0, 1)))
    paths = set(draw(st.lists(st.lists(NAMES, min_size=1, max_size=3), max_size=8).map(
        lambda found: ["/" + "/".join(parts) for parts in found]
    )))
    if draw(st.booleans()):
        paths.add("/")
    ancestors = {"/"}
    for path in paths:
        while path != "/":
            path = parent(path)
            ancestors.add(path)
    tree: dict[str, Entry] = {}
    for path in sorted(paths, key=path_sort_key):  # hardlink targets must come first
        kind = Kind.DIRECTORY
        if path != "/" and path not in ancestors:
            kind = draw(st.sampled_from(LEAF_KINDS))
        targets = [name for name, entry in tree.items() if entry.kind is Kind.REGULAR]
        if kind is Kind.HARDLINK and not targets:
            kind = Kind.REGULAR
        tree[path] = draw(entries(kind, version, targets))
    order = draw(st.permutations(list(tree)))
    return Manifest(version, {path: tree[path] for path in order})


@PROPERTY
@given(manifests())
def test_encode_decode_round_trip(manifest: Manifest) -> None:
    data = encode(manifest)
    decoded = decode(data)
    assert decoded == manifest
    assert list(decoded.entries) == sorted(manifest.entries, key=path_sort_key)
    assert encode(decoded) == data
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data  # cbor2 agrees: canonical


def _both_ways(data: bytes, limits: Limits = fmt.DEFAULT_LIMITS) -> Manifest | str:
    """The manifest (or the error) of ``data``, the same with and without the fast path."""
    outcomes: list[Manifest | str] = []
    for fast in (True, False):
        try:
            outcomes.append(fmt._decode(data, limits, "manifest", fast=fast))
        except FormatError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


def _decode_or_format_error(data: bytes, limits: Limits = fmt.DEFAULT_LIMITS) -> Manifest | None:
    manifest = _both_ways(data, limits)
    if isinstance(manifest, str):
        assert "\n" not in manifest
        return None
    assert decode(encode(manifest)) == manifest  # whatever decodes is a valid manifest
    return manifest


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_give_format_error(data: bytes) -> None:
    _decode_or_format_error(data)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_inside_a_files_map_only_give_format_error(tail: bytes) -> None:
    head = cbor2.dumps(cbor2.CBORTag(OCIX_TAG, None))[:-1] + b"\xa2\x65files"
    _decode_or_format_error(head + tail)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(("flip", "set", "insert", "delete", "truncate")),
              st.integers(0, 2**16), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(manifests(), MUTATIONS)
def test_mutated_manifests_give_format_error_or_a_valid_manifest(
    manifest: Manifest, mutations: list[tuple[str, int, int]]
) -> None:
    data = bytearray(encode(manifest))
    for operation, where, value in mutations:
        where %= len(data) + 1
        if operation == "insert":
            data[where:where] = bytes([value])
        elif where == len(data):
            continue
        elif operation == "flip":
            data[where] ^= 1 << (value % 8)
        elif operation == "set":
            data[where] = value
        elif operation == "delete":
            del data[where]
        else:
            del data[where:]
    _decode_or_format_error(bytes(data))


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4)
    | st.binary(max_size=33) | st.just(cbor2.undefined),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=4) | st.integers(0, 3), inner, max_size=3)
    | st.builds(cbor2.CBORTag, st.sampled_from((0, 1, 2, 37, OCIX_TAG)), inner),
    max_leaves=8,
)
PLAUSIBLE = {
    "mode": st.just([[True] * 3] * 3 + [False] * 3),
    "type": st.sampled_from([kind.value for kind in Kind] + ["socket"]),
    "uid": st.integers(0, 2**33),
    "mtime": st.just("2020-01-01T00:00:00Z"),
    "regularfile": st.tuples(st.integers(0, 3), st.binary(min_size=32, max_size=32)).map(list),
    "link": st.just(["/a"]),
    "xattrs": st.just({"user.a": b"1"}),
}
KEYS = [*PLAUSIBLE, "gid", "username", "atime", "directory", "symlink", "character", "block",
        "fifo", "zzz"]


@st.composite
def wire_entries(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=6))
    return {key: draw(PLAUSIBLE[key] | CBOR_VALUES if key in PLAUSIBLE else CBOR_VALUES)
            for key in keys}


@FUZZ
@given(st.dictionaries(st.sampled_from(["/", "/a", "/a/b", "/b", "a", "/a/"]), wire_entries(),
                       max_size=3),
       st.sampled_from([0, 1, 2]))
def test_random_cbor_in_entries_only_gives_format_error(
    files: dict[str, Any], version: int
) -> None:
    data = cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"version": version, "files": files}),
                       canonical=True)
    _decode_or_format_error(data)


# Entries of the shapes the fast path reads, with values at and past every bound it checks.
MODE_TRUE = [[True] * 3] * 3 + [False] * 3
NEAR_FAST = {
    "mode": st.just(MODE_TRUE) | st.just([[True] * 3] * 3 + [False, 1, False]),
    "uid": st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]),
    "gid": st.integers(0, 2**33),
    "username": st.text(max_size=30) | st.just("\u00e9" * 12),
    "groupname": st.text(st.sampled_from("a\u00e9\0"), max_size=26),
    "atime": st.sampled_from(["2020-01-01T00:00:00Z", "2020-02-30T00:00:00Z", "x" * 20,
                              "2020-01-01T00:00:00.123456789+01:00", "9999-12-31T23:59:59Z"]),
    "mtime": st.sampled_from(["2020-01-01T00:00:00Z", "2020-01-01T00:00:00.5Z", "0" * 24,
                              "2020-01-01T24:00:00Z", "1970-01-01T00:00:00.000000001Z"]),
    "symlink": st.lists(st.text(st.sampled_from("ab/\u00e9"), min_size=1, max_size=40),
                        min_size=1, max_size=1)
    | st.lists(st.text(st.sampled_from("ab/\0\u00e9"), max_size=40), max_size=2),
    "regularfile": st.tuples(st.sampled_from([0, 23, 24, 100, 101, 2**32, 2**50, 2**50 + 1]),
                             DIGESTS).map(list)
    | st.lists(st.integers(0, 2**64 - 1) | st.binary(min_size=31, max_size=33), max_size=3),
    "directory": st.just([]) | st.just([]) | st.just([0]),
    "xattrs": st.just({"user.a": b"1"}),
}


@st.composite
def near_fast_entries(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["regularfile", "directory", "symlink"]))
    keys = draw(st.lists(st.sampled_from(sorted(NEAR_FAST)), unique=True, max_size=4))
    entry = {key: draw(NEAR_FAST[key]) for key in keys}
    entry.setdefault("mode", MODE_TRUE)
    entry["type"] = kind if draw(st.integers(0, 9)) else draw(st.sampled_from(
        ["regularfile", "directory", "symlink", "fifo"]))
    entry.setdefault(kind, draw(NEAR_FAST[kind]))
    return entry


@FUZZ
@given(st.dictionaries(st.sampled_from(["/", "/a", "/a/b", "/b"]), near_fast_entries(),
                       min_size=1, max_size=3),
       st.sampled_from([0, 1]), st.booleans())
def test_the_fast_path_gives_what_the_general_reader_gives(
    files: dict[str, Any], version: int, small: bool
) -> None:
    data = cbor2.dumps(cbor2.CBORTag(OCIX_TAG, {"version": version, "files": files}),
                       canonical=True)
    limits = Limits(max_symlink_bytes=3, max_file_size=100) if small else fmt.DEFAULT_LIMITS
    _decode_or_format_error(data, limits)


def test_the_fast_path_reads_most_entries_and_agrees_on_the_corpus() -> None:
    from scripts.bench_format import generate

    data = encode(generate(3000))
    reader = fmt._Reader(data, fmt.DEFAULT_LIMITS)
    version, entries = reader.manifest()
    assert len(reader.unchecked) < len(entries) // 10
    assert Manifest(version, entries) == fmt._decode(data, fmt.DEFAULT_LIMITS, "m", fast=False)
    for case in sorted((Path(__file__).parent / "hostile").glob("*.ocix")):
        _both_ways(case.read_bytes())


GO_RFC3339NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z")


@PROPERTY
@given(st.integers(MIN_TIME_NS, MAX_TIME_NS))
def test_time_text_round_trip(ns: int) -> None:
    text = format_time(ns)
    assert GO_RFC3339NANO.fullmatch(text)
    assert parse_time(text) == ns


@PROPERTY
@given(st.integers(MIN_TIME_NS + 10**14, MAX_TIME_NS - 10**14),
       st.integers(-(24 * 60 - 1), 24 * 60 - 1))
def test_times_with_an_offset_are_the_same_instant(ns: int, offset_minutes: int) -> None:
    local = format_time(ns + offset_minutes * 60 * 10**9)[:-1]
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    assert parse_time(f"{local}{sign}{hours:02d}:{minutes:02d}") == ns
