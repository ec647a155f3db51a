"""Access profiles: the wire format, merging, and the prefetch plan (no FUSE, no network)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocixfs.errors import FormatError
from ocixfs.image.format import Chunk, Entry, Kind, Manifest
from ocixfs.image.tree import Tree
from ocixfs.mount.prefetch import plan
from ocixfs.mount.profile import AccessRecorder, Profile, decode_profile, encode_profile, merge

paths = st.lists(
    st.text(alphabet="abc/._-", min_size=1, max_size=12).map(lambda s: "/" + s.strip("/")),
    unique=True,
    max_size=20,
)


def test_encoding_is_canonical_cbor_written_by_hand() -> None:
    profile = Profile((("/b", 5), ("/a", 5), ("/bin/sh", 0)))
    expected = bytes.fromhex(
        # map(2); both keys encode to 8 bytes, so canonical order is bytewise: e < v.
        "a2"
        "67" + b"entries".hex() + "83"
        "82" + "67" + b"/bin/sh".hex() + "00"
        "82" + "62" + b"/a".hex() + "05"
        "82" + "62" + b"/b".hex() + "05"
        "67" + b"version".hex() + "01"
    )
    assert encode_profile(profile) == expected
    assert decode_profile(expected).entries == (("/bin/sh", 0), ("/a", 5), ("/b", 5))


@given(paths, st.lists(st.integers(0, 10**9), min_size=20, max_size=20))
def test_encode_decode_round_trip(names: list[str], times: list[int]) -> None:
    profile = Profile(tuple(sorted(zip(names, times, strict=False), key=lambda e: (e[1], e[0]))))
    assert decode_profile(encode_profile(profile)) == profile


@pytest.mark.parametrize(
    "body",
    [
        {"version": 2, "entries": []},
        {"entries": []},
        {"version": 1, "entries": [["relative", 1]]},
        {"version": 1, "entries": [["/a", -1]]},
        {"version": 1, "entries": [["/a", True]]},
        {"version": 1, "entries": [["/a"]]},
        {"version": 1, "entries": "nope"},
        [1, 2, 3],
        {"version": 1, "entries": [], "pack": [[b"a" * 31, 1]]},  # not a 32-byte digest
        {"version": 1, "entries": [], "pack": [["a" * 32, 1]]},  # text, not bytes
        {"version": 1, "entries": [], "pack": [[b"a" * 32, 1], [b"a" * 32, 2]]},  # twice
        {"version": 1, "entries": [], "pack": [[b"a" * 32, 1 << 48]]},
        {"version": 1, "entries": [], "pack": [[b"a" * 32, -1]]},
        {"version": 1, "entries": [], "pack": [[b"a" * 32]]},
        {"version": 1, "entries": [], "pack": {"a": 1}},
    ],
)
def test_invalid_profiles_are_refused(body: object) -> None:
    with pytest.raises(FormatError):
        decode_profile(cbor2.dumps(body), source="p")


def test_a_profile_names_its_pack_plan_in_order() -> None:
    """``pack`` (the blobs of the profile's pack set, in order) survives a round trip,
    canonically encoded; a profile without one decodes with an empty plan."""
    plan = (Chunk(5, b"\x02" * 32), Chunk(1, b"\x01" * 32))
    profile = Profile((("/a", 0), ("/b", 3)), plan)
    data = encode_profile(profile)
    assert decode_profile(data) == profile
    assert data == cbor2.dumps(cbor2.loads(data), canonical=True)
    assert decode_profile(encode_profile(Profile((("/a", 0),)))).pack == ()
    assert merge([profile]).pack == ()  # a merged profile's plan is another


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_format_error(data: bytes) -> None:
    try:
        result = decode_profile(data)
    except FormatError:
        return
    assert all(path.startswith("/") for path in result.paths)


def test_merge_keeps_each_paths_earliest_access() -> None:
    host_a = Profile((("/bin/sh", 0), ("/lib/libc.so", 3), ("/etc/a", 40)))
    host_b = Profile((("/bin/sh", 1), ("/etc/b", 2), ("/etc/a", 10)))
    merged = merge([host_a, host_b])
    assert merged.entries == (("/bin/sh", 0), ("/etc/b", 2), ("/lib/libc.so", 3), ("/etc/a", 10))


def test_recorder_notes_first_access_of_each_inode_in_order() -> None:
    recorder = AccessRecorder()
    recorder.note_access("/bin/sh", 5)
    recorder.note_access("/lib/libc.so", 9)
    recorder.note_access("/bin/sh", 5)
    recorder.note_access("/bin/dash", 5)  # another name of inode 5
    assert recorder.profile().paths == ["/bin/sh", "/lib/libc.so"]
    times = [ms for _, ms in recorder.profile().entries]
    assert times == sorted(times)


def _file(data: bytes) -> Entry:
    import blake3

    return Entry(Kind.REGULAR, mode=0o644, size=len(data), digest=blake3.blake3(data).digest())


def test_plan_follows_profile_then_fills_rest_smallest_first_each_blob_once() -> None:
    big, small, tiny, dup = _file(b"b" * 300), _file(b"s" * 20), _file(b"t"), _file(b"s" * 20)
    chunk_a, chunk_b = Chunk(2, b"\x01" * 32), Chunk(1, b"\x02" * 32)
    chunked = Entry(
        Kind.REGULAR, mode=0o644, size=3, digest=b"\x03" * 32, chunks=(chunk_a, chunk_b)
    )
    tree = Tree.from_manifest(
        Manifest(
            1,
            {
                "/": Entry(Kind.DIRECTORY, mode=0o755),
                "/big": big,
                "/small": small,
                "/tiny": tiny,
                "/dup": dup,
                "/chunked": chunked,
            },
        )
    )
    profile = Profile((("/big", 0), ("/missing", 1), ("/chunked", 2), ("/dup", 3)))
    only_profile = plan(tree, profile, fill_rest=False)
    assert only_profile == [*big.blobs, chunk_a, chunk_b, *dup.blobs]
    everything = plan(tree, profile, fill_rest=True)
    assert everything == [*only_profile, *tiny.blobs]
    assert plan(tree, None, fill_rest=False) == []
