"""Profile packs: made by ``ocixfs profile pack`` from a real image's store, played by real
mounts over a real HTTP server (``tests/faultserver.py``) that counts requests and
misbehaves on request (a tampered entry, a cut or missing or stalled pack).

Every mount test reads the files back and compares them with the tree the image was built
from; a blob's single-file requests are counted under both of its names (plain and
``.zst``), since the store is built with zstd.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import zstandard

import ocixfs
from ocixfs.config import PACK_ZSTD_LEVEL
from ocixfs.errors import FormatError
from ocixfs.image.format import Chunk
from ocixfs.image.loading import load_image
from ocixfs.image.tree import Tree
from ocixfs.mount.prefetch import plan
from ocixfs.mount.profile import Profile, decode_profile, encode_profile
from ocixfs.store.layout import pack_name
from ocixfs.store.pack import (
    ENTRY,
    HEADER,
    Encoding,
    PackEntry,
    PackHeader,
    check_first_header,
    deal,
    encode_header,
    pack_set_id,
    parse_entries,
    parse_header,
)
from ocixfs.tools.packs import _stored as stored_entry
from tests.faultserver import Fault, FaultServer, make_store
from tests.mounting import Mount, Mounts, needs_fuse, run_ocixfs, store_args, wait_for
from tests.servers import FaultServers

MiB = 1 << 20


class Image(NamedTuple):
    root: Path
    store: Path
    ocix: Path
    profile: Path
    order: list[str]  # the profile's files, in access order

    def chunks(self) -> list[Chunk]:
        """The profile's blobs, in the order a pack holds them."""
        tree = Tree.from_manifest(load_image(os.fspath(self.ocix)).manifest)
        return plan(tree, Profile(tuple((path, 0) for path in self.order)), fill_rest=False)


def _make_tree(root: Path) -> list[str]:
    """Text files (compressible), random ones (stored plain in packs) and one file of
    several chunks; returns the paths in the order the profile lists them."""
    rng = random.Random(7)
    paths = []
    for i in range(12):
        path = root / "usr" / "lib" / f"text-{i:02}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + "import os\n" * (200 + 300 * i))
        paths.append(path)
        path = root / "usr" / "share" / f"random-{i:02}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(5000 + 9000 * i))
        paths.append(path)
    big = root / "usr" / "lib" / "big.so"
    big.write_bytes(rng.randbytes(2 * MiB + 4321))  # three chunks
    paths.insert(3, big)
    (root / "etc").mkdir()
    (root / "etc" / "unprofiled").write_text("not in the profile\n")
    return ["/" + os.fspath(path.relative_to(root)) for path in paths]


@pytest.fixture
def image(tmp_path: Path) -> Image:
    root = tmp_path / "rootfs"
    order = _make_tree(root)
    store, ocix = tmp_path / "store", tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{root}", "--store", os.fspath(store), "--output", os.fspath(ocix))
    profile = tmp_path / "start.profile"
    profile.write_bytes(encode_profile(Profile(tuple((p, n) for n, p in enumerate(order)))))
    return Image(root, store, ocix, profile, order)


def make_packs(image: Image, parts: int = 1) -> list[Path]:
    run_ocixfs("profile", "pack", os.fspath(image.profile), "--image", os.fspath(image.ocix),
               "--store", os.fspath(image.store), "--parts", str(parts))
    set_id = pack_set_id(image.chunks())
    return [image.store / pack_name(set_id, part) for part in range(parts)]


def single_requests(server: FaultServer, chunks: Sequence[Chunk]) -> list[int]:
    return [server.count(chunk.hex) + server.count(chunk.hex + ".zst") for chunk in chunks]


def cached(cache: Path, chunk: Chunk) -> bool:
    return (cache / "blobs" / chunk.hex[:2] / chunk.hex).is_file()


def assert_files_match(image: Image, mountpoint: Path) -> None:
    for path in image.order:
        assert (mountpoint / path[1:]).read_bytes() == (image.root / path[1:]).read_bytes(), path


def assert_only_fetched_singly(server: FaultServer, image: Image, mount: Mount,
                               singly: set[bytes]) -> None:
    """Exactly the blobs ``singly`` were fetched on their own, once each; then, the server
    gone, every profiled file reads back right from the cache."""
    chunks = image.chunks()
    assert single_requests(server, chunks) == [int(c.digest in singly) for c in chunks]
    server.stop()
    assert_files_match(image, mount.mountpoint)


def prefetch_finished(mount: Mount) -> dict[str, Any]:
    """The prefetch statistics once it finished."""
    def finished() -> bool:
        prefetch = mount.stats()["prefetch"]
        return isinstance(prefetch, dict) and prefetch.get("finished") is True

    wait_for(finished, what="the prefetch to finish")
    prefetch: dict[str, Any] = mount.stats()["prefetch"]  # type: ignore[assignment]
    return prefetch


def table(pack: Path) -> tuple[PackEntry, ...]:
    data = pack.read_bytes()
    _, _, _, count = parse_header(data[:HEADER.size], "pack")
    return parse_entries(data[HEADER.size:HEADER.size + count * ENTRY.size], count, "pack")


def entry_offsets(pack: Path, part: int = 0) -> list[tuple[PackEntry, int]]:
    """Each entry whose body is in ``pack`` (part ``part``), with the offset of that body."""
    entries = table(pack)
    offset = HEADER.size + len(entries) * ENTRY.size
    found = []
    for entry in entries:
        if entry.part == part:
            found.append((entry, offset))
            offset += entry.stored
    return found


# --- the format ---------------------------------------------------------------------------


def test_deal_keeps_each_part_in_plan_order_and_balances_bytes() -> None:
    sizes = [500, 100, 100, 100, 100, 100, 300]
    parts = deal(sizes, 2)
    assert parts == [0, 1, 1, 1, 1, 1, 0]
    assert deal(sizes, 1) == [0] * len(sizes)
    assert deal([10, 10], 5) == [0, 1]  # never more parts than entries


def test_header_round_trip_and_checks() -> None:
    chunks = [Chunk(10, bytes([i + 1]) * 32) for i in range(3)]
    set_id = pack_set_id(chunks)
    entries = tuple(PackEntry(c.digest, 10, Encoding.NONE, i % 2) for i, c in enumerate(chunks))
    raw = encode_header(PackHeader(set_id, 0, 2, entries))
    assert parse_header(raw[:HEADER.size], "p") == (set_id, 0, 2, 3)
    header = PackHeader(set_id, 0, 2, parse_entries(raw[HEADER.size:], 3, "p"))
    assert header.entries == entries
    planned = {c.digest: c for c in chunks}
    check_first_header(header, set_id, planned, "p")
    bad = [
        PackHeader(bytes(32), 0, 2, entries),  # another set
        PackHeader(set_id, 0, 2, (*entries, entries[0])),  # a blob twice
        PackHeader(set_id, 0, 2, (PackEntry(b"\xff" * 32, 1, Encoding.NONE, 0),)),  # unplanned
        PackHeader(set_id, 0, 2, (PackEntry(chunks[0].digest, 11, Encoding.NONE, 0),)),
        PackHeader(set_id, 0, 1, entries),  # an entry in part 1 of 1
    ]
    for header in bad:
        with pytest.raises(FormatError):
            check_first_header(header, set_id, planned, "p")
    for broken in (b"", raw[:20], b"NOTAPACK" + raw[8:HEADER.size],
                   raw[:8] + b"\x02" + raw[9:HEADER.size]):
        with pytest.raises(FormatError):
            parse_header(broken, "p")


def test_the_set_is_named_by_its_blobs_in_order() -> None:
    a, b = Chunk(1, b"a" * 32), Chunk(1, b"b" * 32)
    assert pack_set_id([a, b]) == pack_set_id([a, b]) != pack_set_id([b, a])


# --- making packs ---------------------------------------------------------------------------


def test_profile_pack_writes_the_set_in_access_order(image: Image) -> None:
    packs = make_packs(image, parts=3)
    chunks = image.chunks()
    found: list[bytes] = []
    for part, pack in enumerate(packs):
        data = pack.read_bytes()
        set_id, number, parts, count = parse_header(data[:HEADER.size], "pack")
        assert (set_id, number, parts) == (pack_set_id(chunks), part, 3)
        entries = parse_entries(data[HEADER.size:HEADER.size + count * ENTRY.size], count, "p")
        own = [entry.digest for entry in entries if entry.part == part]
        assert own == [c.digest for c in chunks if c.digest in own]  # in plan order
        found += own
    assert sorted(found) == sorted(c.digest for c in chunks)
    assert not list((image.store / "packs").glob(".tmp-*"))


def _fails_cleanly(*args: str) -> str:
    result = run_ocixfs("profile", "pack", *args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocixfs: "), result.stderr
    return lines[0]


def test_profile_pack_bad_inputs_are_one_line_errors_and_write_nothing(
    image: Image, tmp_path: Path
) -> None:
    profile, ocix, store = (os.fspath(p) for p in (image.profile, image.ocix, image.store))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xa1\x00not cbor")
    elsewhere = tmp_path / "unrelated.profile"
    elsewhere.write_bytes(encode_profile(Profile((("/no/such/file", 0),))))
    assert "no such" in _fails_cleanly(os.fspath(tmp_path / "missing"), "--image", ocix,
                                        "--store", store).lower()
    _fails_cleanly(os.fspath(garbage), "--image", ocix, "--store", store)
    _fails_cleanly(profile, "--image", os.fspath(garbage), "--store", store)
    assert "nothing to pack" in _fails_cleanly(os.fspath(elsewhere), "--image", ocix,
                                               "--store", store)
    assert "not a local blob store" in _fails_cleanly(profile, "--image", ocix, "--store",
                                                      os.fspath(tmp_path))
    assert "--parts" in _fails_cleanly(profile, "--image", ocix, "--store", store,
                                       "--parts", "0")
    assert "--zstd-level" in _fails_cleanly(profile, "--image", ocix, "--store", store,
                                            "--zstd-level", "23")
    victim = image.chunks()[5]
    (image.store / "blobs" / "blake3" / victim.hex).write_bytes(b"damaged")
    assert victim.hex in _fails_cleanly(profile, "--image", ocix, "--store", store,
                                        "--parts", "2")
    assert not (image.store / "packs").exists()
    (image.store / "blobs" / "blake3" / victim.hex).unlink()
    assert "not in the store" in _fails_cleanly(profile, "--image", ocix, "--store", store)
    assert not (image.store / "packs").exists()


def test_profile_pack_cannot_write_leaves_nothing(image: Image) -> None:
    (image.store / "packs").write_bytes(b"a file where the directory goes")
    line = _fails_cleanly(os.fspath(image.profile), "--image", os.fspath(image.ocix),
                          "--store", os.fspath(image.store))
    assert "cannot write" in line
    assert sorted(p.name for p in image.store.iterdir()) == ["blobs", "ocix-store.json",
                                                              "packs"]


# --- playing packs in a mount --------------------------------------------------------------

def _mount(mounts: Mounts, image: Image, server: FaultServer, tmp_path: Path,
           *more: str) -> Mount:
    args = store_args([server.url], tmp_path / "cache", "--prefetch", os.fspath(image.profile),
                      *more)
    return mounts(image.ocix, tmp_path / "mnt", *args)


@pytest.mark.parametrize("parts", [1, 3])
@needs_fuse
@pytest.mark.mount
def test_a_profiled_mount_fetches_each_pack_with_one_request(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts, parts: int
) -> None:
    packs = make_packs(image, parts)
    server = serve(image.store)
    with _mount(mounts, image, server, tmp_path) as mount:
        prefetch = prefetch_finished(mount)
        assert [server.count(pack.name) for pack in packs] == [1] * parts
        assert prefetch["packs"]["blobs_delivered"] == len(image.chunks())
        assert_only_fetched_singly(server, image, mount, set())


def test_entries_are_compressed_at_the_level_asked_for(tmp_path: Path) -> None:
    """Source text (this package's own) stored at zstd level 19, the default, is smaller
    than at level 1 and than the store's own ``.zst`` (level 3); it unpacks to the blob."""
    sources = sorted(Path(ocixfs.__file__).parent.rglob("*.py"))
    text = b"".join(path.read_bytes() for path in sources)
    chunk = make_store(tmp_path, [text], zstd=True)[0]
    stored = (tmp_path / "blobs" / "blake3" / f"{chunk.hex}.zst").read_bytes()
    fast, encoding = stored_entry(tmp_path, chunk, level=1)
    best, _ = stored_entry(tmp_path, chunk, level=PACK_ZSTD_LEVEL)
    assert encoding is Encoding.ZSTD and len(best) < min(len(fast), len(stored))
    assert zstandard.ZstdDecompressor().decompress(best) == text


def test_profile_pack_names_the_set_in_the_profile(image: Image) -> None:
    """``profile pack`` rewrites the profile to name its set (the plan it holds), so that
    a mount can ask for the set before its manifest arrives; packing again changes
    nothing."""
    assert decode_profile(image.profile.read_bytes()).pack == ()
    make_packs(image)
    named = decode_profile(image.profile.read_bytes())
    assert named.pack == tuple(image.chunks())
    assert named.entries == tuple((p, n) for n, p in enumerate(image.order))
    make_packs(image)
    assert decode_profile(image.profile.read_bytes()) == named


@needs_fuse
@pytest.mark.mount
def test_the_named_set_is_asked_for_before_the_manifest_arrives(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts
) -> None:
    """With the manifest held back by the server, the pack set the profile names is
    requested (and its blobs cached, each verified) while the mount command still waits;
    the mount then serves every file, and nothing is fetched twice."""
    packs = make_packs(image)
    server = serve(image.ocix.parent)  # image.ocix and store/ side by side
    server.fault(image.ocix.name, Fault(stall=3.0), times=1)
    args = store_args([f"{server.url}/store/"], tmp_path / "cache", "--prefetch",
                      os.fspath(image.profile))
    mount = mounts(f"{server.url}/{image.ocix.name}", tmp_path / "mnt", *args)
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(mount.start)
        wait_for(lambda: all(cached(tmp_path / "cache", c) for c in image.chunks()),
                 timeout=20, what="the pack's blobs in the cache")
        assert not started.done()  # the manifest is still held back
        started.result(timeout=60)  # (the mounts fixture unmounts it)
    prefetch = prefetch_finished(mount)
    assert server.count(packs[0].name) == 1 and server.count(image.ocix.name) == 1
    assert prefetch["packs"]["blobs_delivered"] == len(image.chunks())
    assert_only_fetched_singly(server, image, mount, set())


@needs_fuse
@pytest.mark.mount
def test_no_packs_fetches_blob_by_blob(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts
) -> None:
    packs = make_packs(image)
    server = serve(image.store)
    chunks = image.chunks()
    with _mount(mounts, image, server, tmp_path, "--no-packs") as mount:
        prefetch_finished(mount)
        assert server.count(packs[0].name) == 0
        assert single_requests(server, chunks) == [1] * len(chunks)


def _tamper(pack: Path, victim_index: int) -> PackEntry:
    """Flip one byte in the middle of an entry stored as it is (not zstd)."""
    plain = [(e, at) for e, at in entry_offsets(pack) if e.encoding is Encoding.NONE]
    entry, offset = plain[victim_index]
    data = bytearray(pack.read_bytes())
    data[offset + entry.stored // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    return entry


@needs_fuse
@pytest.mark.mount
def test_a_tampered_entry_is_refused_and_fetched_on_its_own(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts
) -> None:
    [pack] = make_packs(image)
    victim = _tamper(pack, 2)
    server = serve(image.store)
    with _mount(mounts, image, server, tmp_path) as mount:
        prefetch = prefetch_finished(mount)
        assert prefetch["packs"]["blobs_refused"] == 1
        assert_only_fetched_singly(server, image, mount, {victim.digest})


@needs_fuse
@pytest.mark.mount
def test_a_tampered_entry_is_never_served_nor_cached(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts
) -> None:
    [pack] = make_packs(image)
    victim = _tamper(pack, 1)
    server = serve(image.store)
    for name in (victim.digest.hex(), victim.digest.hex() + ".zst"):
        server.fault(name, Fault(status=404))  # and no good copy anywhere
    chunks = image.chunks()
    cache = tmp_path / "cache"
    with _mount(mounts, image, server, tmp_path) as mount:
        prefetch_finished(mount)
        assert [cached(cache, c) for c in chunks] == [c.digest != victim.digest for c in chunks]
        tree = Tree.from_manifest(load_image(os.fspath(image.ocix)).manifest)
        bad = [p for p in image.order
               if victim.digest in [c.digest for c in tree.node_by_path(p).blobs]]  # type: ignore[union-attr]
        with pytest.raises(OSError) as failure:
            (mount.mountpoint / bad[0][1:]).read_bytes()
        assert failure.value.errno == errno.EIO


@needs_fuse
@pytest.mark.mount
def test_a_pack_cut_mid_body_keeps_what_arrived(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts
) -> None:
    [pack] = make_packs(image)
    entries = entry_offsets(pack)
    cut_entry, cut_at = entries[len(entries) // 2]
    server = serve(image.store)
    server.fault(pack.name, Fault(truncate=cut_at + cut_entry.stored // 2))
    half = len(entries) // 2
    with _mount(mounts, image, server, tmp_path) as mount:
        prefetch = prefetch_finished(mount)
        assert prefetch["packs"]["blobs_delivered"] == half
        assert_only_fetched_singly(server, image, mount, {e.digest for e, _ in entries[half:]})


@pytest.mark.parametrize("missing_part", [0, 1])
@needs_fuse
@pytest.mark.mount
def test_a_missing_pack_falls_back_to_single_fetches(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts, missing_part: int
) -> None:
    packs = make_packs(image, parts=3)
    lost = {e.digest for e in table(packs[0]) if e.part == missing_part or missing_part == 0}
    packs[missing_part].unlink()
    server = serve(image.store)
    with _mount(mounts, image, server, tmp_path) as mount:
        prefetch_finished(mount)
        assert server.count(packs[missing_part].name) == 1
        if missing_part == 0:  # the set is unknown: its other parts are not asked for
            assert [server.count(p.name) for p in packs[1:]] == [0, 0]
        assert_only_fetched_singly(server, image, mount, lost)


@needs_fuse
@pytest.mark.mount
def test_a_stalled_pack_does_not_hold_an_on_demand_read_past_its_deadline(
    image: Image, tmp_path: Path, serve: FaultServers, mounts: Mounts
) -> None:
    [pack] = make_packs(image)
    entries = entry_offsets(pack)
    server = serve(image.store)
    # The header comes, then nothing for a minute: the read's deadline is 6 s, the pack's
    # socket read timeout 10 s, so only giving up on the pack in time serves the read.
    server.fault(pack.name, Fault(stall_body=60, stall_after=entries[0][1]))
    first = image.order[0]
    chunks = image.chunks()
    with _mount(mounts, image, server, tmp_path, "--deadline", "6") as mount:
        wait_for(lambda: mount.stats()["reader"]["in_flight"] == len(chunks),  # type: ignore[index]
                 what="the pack's blobs to be in flight")
        data = (mount.mountpoint / first[1:]).read_bytes()
        assert data == (image.root / first[1:]).read_bytes()
        assert single_requests(server, chunks[:1]) == [1]
