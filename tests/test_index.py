"""The host's image index: the tree it gives equals the manifest's, a second load uses it,
a damaged, foreign or planted index (or one under another host key) is rebuilt,
concurrent writers never tear it, and a real mount of an image seen before serves the
tree from the index."""

from __future__ import annotations

import multiprocessing
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ocixfs.cache import index
from ocixfs.cache.index import LOADS, check_indexes, index_path, load_tree, read_index
from ocixfs.errors import FormatError
from ocixfs.image.format import Entry, Kind, Manifest, decode, encode, manifest_digest
from ocixfs.image.packed import pack, read_columns, serialize, unpack
from ocixfs.image.tree import Tree
from scripts.bench_format import generate
from tests.mounting import Mounts, fuse_available, run_ocixfs
from tests.treesamples import sample

HOSTILE = Path(__file__).parent / "hostile"


def signature(tree: Tree) -> list[Any]:
    """Everything a tree says: each node's number, kind, entry, path, parent, link count
    and children (name → number), and the counts."""
    nodes = [(n.ino, n.kind, n.entry, n.path, n.parent.ino, n.nlink,
              None if n.children is None else {k: v.ino for k, v in n.children.items()},
              [(name, child.ino) for name, child in n.listing()])
             for n in tree.iter_nodes()]
    return [nodes, tree.entry_count, tree.inode_count, tree.totals]


MANIFESTS: dict[str, Callable[[], bytes]] = {
    "sample": lambda: encode(sample().manifest),
    "generated-v0": lambda: encode(generate(3000, version=0)),
    "generated-v1": lambda: encode(generate(3000, version=1, seed=7)),
    "hostile-baseline": lambda: (HOSTILE / "baseline.ocix").read_bytes(),
}


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    LOADS.from_index = LOADS.from_manifest = LOADS.refused = 0


@pytest.mark.parametrize("name", MANIFESTS)
def test_index_tree_equals_the_manifest_tree(name: str, tmp_path: Path) -> None:
    data = MANIFESTS[name]()
    expected = signature(Tree.from_manifest(decode(data)))
    assert signature(unpack(pack(Tree.from_manifest(decode(data))))) == expected
    cache = tmp_path / "cache"
    digest = manifest_digest(data)
    assert signature(load_tree(data, digest, cache, source=name)) == expected
    lazy = load_tree(data, digest, cache, source=name)
    assert LOADS.from_index == 1
    # Lazily made nodes are the same when reached by path first, then by number.
    for path in decode(data).entries:
        found = lazy.node_by_path(path)
        assert found is not None and lazy.get(found.ino) is found
    assert signature(lazy) == expected


def test_a_path_lookup_in_an_unpacked_tree_makes_only_the_nodes_on_its_path() -> None:
    data = encode(generate(3000))
    eager = Tree.from_manifest(decode(data))
    lazy = unpack(pack(eager))
    paths = list(decode(data).entries)
    probes = [*paths[::7], "/", "/nowhere", "//", "/usr/", "usr", paths[-1] + "/x",
              paths[-1] + "x", "/\udcff", "/\ud800", "/" + "a" * 300]
    deep = max(paths, key=lambda path: path.count("/"))
    found = lazy.node_by_path(deep)
    assert found is not None and found.path == eager.node_by_path(deep).path  # type: ignore[union-attr]
    made = sum(node is not None for node in lazy._nodes)
    assert made <= deep.count("/") + 2  # the root, each directory on the way, the file
    assert lazy.root.unfold is not None  # no directory was unfolded
    for path in probes:
        expected = eager.node_by_path(path)
        got = lazy.node_by_path(path)
        assert (got is None) == (expected is None), path
        assert got is None or expected is None or (got.ino, got.path) == (expected.ino,
                                                                          expected.path)


def test_second_load_uses_the_index_not_the_manifest(tmp_path: Path) -> None:
    data = MANIFESTS["sample"]()
    digest = manifest_digest(data)
    load_tree(data, digest, tmp_path / "cache", source="m")
    assert (LOADS.from_manifest, LOADS.from_index) == (1, 0)
    assert index_path(tmp_path / "cache", digest).is_file()
    assert load_tree(data, digest, tmp_path / "cache", source="m").node_by_path("/etc/motd")
    assert (LOADS.from_manifest, LOADS.from_index) == (1, 1)


def test_no_cache_directory_means_no_index(tmp_path: Path) -> None:
    data = MANIFESTS["sample"]()
    load_tree(data, manifest_digest(data), None, source="m")
    load_tree(data, manifest_digest(data), None, source="m")
    assert (LOADS.from_manifest, LOADS.from_index) == (2, 0)


def test_a_bad_manifest_is_refused_and_leaves_no_index(tmp_path: Path) -> None:
    data = (HOSTILE / "hardlink-cycle.ocix").read_bytes()
    with pytest.raises(FormatError, match="^bad: "):
        load_tree(data, manifest_digest(data), tmp_path / "cache", source="bad")
    assert not (tmp_path / "cache" / "index").exists() or not os.listdir(tmp_path / "cache/index")


FOREIGN_KEY = bytes(range(32))


def _frame(digest: str, payload: bytes, key: bytes = FOREIGN_KEY) -> bytes:
    """An index file as a writer with ``key`` makes it (by default not this host's)."""
    return index._index_file(digest, payload, key)


def _host_key(path: Path) -> bytes:
    return index._read_key(path.parent / index.HOST_KEY)


def _other_tree_payload() -> bytes:
    entries = dict(sample().manifest.entries)
    entries["/planted"] = Entry(Kind.DIRECTORY, mode=0o700)
    return pack(Tree.from_manifest(Manifest(1, entries)))


def _damage(kind: str, path: Path, digest: str) -> None:
    good = path.read_bytes()
    at = index._HEADER.size + 100
    if kind == "payload-byte":
        path.write_bytes(good[:at] + bytes([good[at] ^ 1]) + good[at + 1:])
    elif kind == "header-byte":
        path.write_bytes(good[:3] + bytes([good[3] ^ 1]) + good[4:])
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other-digest":
        path.write_bytes(_frame("b3:" + "ab" * 32, _other_tree_payload(), _host_key(path)))
    elif kind == "other-key":  # a good index of this manifest, from another host
        path.write_bytes(_frame(digest, good[index._HEADER.size:]))
    elif kind == "key-replaced":
        (path.parent / index.HOST_KEY).write_bytes(FOREIGN_KEY)
    elif kind == "key-removed":
        (path.parent / index.HOST_KEY).unlink()
    elif kind == "key-readable":
        (path.parent / index.HOST_KEY).chmod(0o644)
    elif kind == "key-short":
        (path.parent / index.HOST_KEY).write_bytes(_host_key(path)[:16])
    elif kind == "other-version":
        path.write_bytes(good[:8] + struct.pack("<I", index.FORMAT_VERSION + 1) + good[12:])
    elif kind == "hostile-payload":  # a forward parent reference, without the host key
        path.write_bytes(_frame(digest, _hostile_payload()))
    elif kind == "symlink":
        elsewhere = path.with_name("elsewhere")
        elsewhere.write_bytes(_frame(digest, _other_tree_payload()))
        path.unlink()
        path.symlink_to(elsewhere)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "other-owner":
        path.write_bytes(_frame(digest, _other_tree_payload()))
        os.chown(path, 65534, 65534)
    else:
        raise AssertionError(kind)


def _hostile_payload() -> bytes:
    columns = read_columns(memoryview(_other_tree_payload()))
    columns["parent"][3] = 20
    return serialize(columns)


DAMAGES = ["payload-byte", "header-byte", "truncated", "empty", "other-digest", "other-key",
           "key-replaced", "key-removed", "key-readable", "key-short", "other-version",
           "hostile-payload", "symlink", "fifo", "other-owner"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_or_planted_index_is_rebuilt(kind: str, tmp_path: Path) -> None:
    if kind == "other-owner" and os.geteuid() != 0:
        pytest.skip("chown needs root")
    data = MANIFESTS["sample"]()
    digest = manifest_digest(data)
    cache = tmp_path / "cache"
    expected = signature(load_tree(data, digest, cache, source="m"))
    path = index_path(cache, digest)
    _damage(kind, path, digest)
    assert signature(load_tree(data, digest, cache, source="m")) == expected
    assert (LOADS.refused, LOADS.from_manifest) == (1, 2)
    assert not path.is_symlink() and path.stat().st_uid == os.geteuid()
    assert (path.parent / index.HOST_KEY).stat().st_mode & 0o777 == 0o600
    assert signature(read_index(path, digest)) == expected  # rebuilt, good again
    assert signature(load_tree(data, digest, cache, source="m")) == expected
    assert LOADS.from_index == 1


def test_every_truncation_and_byte_flip_is_refused(tmp_path: Path) -> None:
    """No damage crashes the loader: each gives FormatError (or, for a flip in the
    checksum-covered payload, a checksum mismatch)."""
    data = MANIFESTS["sample"]()
    digest = manifest_digest(data)
    path = tmp_path / "x.index"
    good = _frame(digest, pack(Tree.from_manifest(decode(data))), index._host_key(tmp_path))
    path.write_bytes(good)
    assert signature(read_index(path, digest)) == signature(Tree.from_manifest(decode(data)))
    for cut in range(0, len(good), 7):
        path.write_bytes(good[:cut])
        with pytest.raises(FormatError):
            read_index(path, digest)
    for at in range(0, len(good), 5):
        path.write_bytes(good[:at] + bytes([good[at] ^ 0x40]) + good[at + 1:])
        with pytest.raises(FormatError):
            read_index(path, digest)


def test_unpack_refuses_inconsistent_payloads_without_crashing() -> None:
    """Every 8-byte word of a payload set to all ones: ``unpack`` refuses it or gives a
    tree whose every node can be made."""
    payload = bytearray(pack(Tree.from_manifest(sample().manifest)))
    for at in range(0, len(payload) - 8, 8):
        hostile = payload[:at] + b"\xff" * 8 + payload[at + 8:]
        try:
            tree = unpack(bytes(hostile))
        except FormatError:
            continue
        for node in tree.iter_nodes():
            node.listing()
            _ = (node.mode, node.size, node.rdev, node.blobs, node.xattrs, node.link_target)


def _write_many(cache: str, data: bytes, rounds: int) -> None:
    for _ in range(rounds):
        index.write_index(Path(cache), manifest_digest(data), Tree.from_manifest(decode(data)))


def test_concurrent_writers_never_tear_the_index(tmp_path: Path) -> None:
    data = encode(generate(2000))
    digest = manifest_digest(data)
    cache = tmp_path / "cache"
    expected = signature(Tree.from_manifest(decode(data)))
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(str(cache), data, 6)) for _ in range(3)]
    for writer in writers:
        writer.start()
    reads = 0
    try:
        while any(writer.is_alive() for writer in writers):
            try:
                tree = read_index(index_path(cache, digest), digest)
            except FileNotFoundError:
                continue
            reads += 1
            assert tree.totals == Tree.from_manifest(decode(data)).totals if reads == 1 else True
    finally:
        for writer in writers:
            writer.join(60)
    assert all(writer.exitcode == 0 for writer in writers)
    assert signature(read_index(index_path(cache, digest), digest)) == expected
    assert sorted(os.listdir(cache / "index")) == sorted([index_path(cache, digest).name,
                                                          index.HOST_KEY])


def test_old_indexes_beyond_the_count_are_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for seed in range(index.KEEP_INDEXES + 3):
        data = encode(generate(20, seed=seed))
        load_tree(data, manifest_digest(data), cache, source="m")
    assert len(os.listdir(cache / "index")) == index.KEEP_INDEXES + 1  # and the key


def test_fsck_removes_bad_indexes_and_keeps_good_ones(tmp_path: Path) -> None:
    data = MANIFESTS["sample"]()
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True, mode=0o700)
    load_tree(data, manifest_digest(data), cache, source="m")
    other = encode(generate(50))
    load_tree(other, manifest_digest(other), cache, source="m")
    _damage("truncated", index_path(cache, manifest_digest(other)), manifest_digest(other))
    os.mkfifo(cache / "index" / "stray")
    result = run_ocixfs("cache", "fsck", "--cache-dir", os.fspath(cache), "--json", check=False)
    assert result.returncode == 1, result.stderr
    assert sorted(os.listdir(cache / "index")) == sorted([
        index_path(cache, manifest_digest(data)).name, index.HOST_KEY])
    assert check_indexes(cache).good == 1


def test_fsck_checks_the_payload_even_under_the_host_key(tmp_path: Path) -> None:
    """A load trusts what the host key authenticates; ``fsck`` re-checks every bound, so
    a payload only a key holder could plant is still found and removed there."""
    data = MANIFESTS["sample"]()
    digest = manifest_digest(data)
    cache = tmp_path / "cache"
    load_tree(data, digest, cache, source="m")
    path = index_path(cache, digest)
    path.write_bytes(_frame(digest, _hostile_payload(), _host_key(path)))
    with pytest.raises(FormatError, match="a parent after its child"):
        read_index(path, digest, check=True)
    assert check_indexes(cache) == index.IndexCheck(0, (str(path),))
    assert sorted(os.listdir(cache / "index")) == [index.HOST_KEY]


def test_racing_writers_share_one_host_key(tmp_path: Path) -> None:
    """The key is linked into place, never renamed over: the first maker's key stays."""
    directory = tmp_path / "index"
    directory.mkdir(mode=0o700)
    first = index._host_key(directory)
    assert index._host_key(directory) == first and len(first) == 32
    assert sorted(os.listdir(directory)) == [index.HOST_KEY]


# ---- a real mount --------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs root and /dev/fuse")


@needs_fuse
@pytest.mark.mount
def test_a_mount_of_an_image_seen_before_serves_the_tree_from_its_index(
    tmp_path: Path, mounts: Mounts
) -> None:
    source = tmp_path / "src"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "hostname").write_text("indexed\n")
    store, cache, image = tmp_path / "store", tmp_path / "cache", tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{source}", "--store", os.fspath(store), "--output",
               os.fspath(image), "--compress", "none")
    digest = manifest_digest(image.read_bytes())
    # --fuse-only: FUSE serves the tree as the index has it (stacked, the kernel would
    # serve the metadata image's copy of it)
    args = ("--store", os.fspath(store), "--cache-dir", os.fspath(cache), "--fuse-only")
    mountpoint = tmp_path / "mnt"
    with mounts(image, mountpoint, *args):
        assert (mountpoint / "etc" / "hostname").read_text() == "indexed\n"
    path = index_path(cache, digest)
    built = signature(read_index(path, digest))
    # A second mount reads the index: one re-signed (host key) for this digest with an extra
    # directory shows it (the manifest has no such directory).
    manifest = decode(image.read_bytes())
    entries = {**manifest.entries, "/from-the-index": Entry(Kind.DIRECTORY, mode=0o755)}
    path.write_bytes(_frame(digest, pack(Tree.from_manifest(Manifest(1, entries))),
                            _host_key(path)))
    with mounts(image, mountpoint, *args):
        assert (mountpoint / "from-the-index").is_dir()
    # A damaged one is not used: the mount serves the manifest's tree and rebuilds it.
    _damage("payload-byte", path, digest)
    with mounts(image, mountpoint, *args):
        assert not (mountpoint / "from-the-index").exists()
        assert (mountpoint / "etc" / "hostname").read_text() == "indexed\n"
    assert signature(read_index(path, digest)) == built
