"""The inode table: numbering, implicit parents, hardlinks, stat data, listings, totals."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocixfs.errors import FormatError
from ocixfs.image.format import Entry, Kind, Manifest
from ocixfs.image.tree import IMPLICIT_DIR_MODE, ROOT_INO, Node, Tree
from tests.treesamples import BIG_CHUNKS, T0, T1, canonical, digest, regular, sample


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree.from_manifest(sample().manifest)


def node(tree: Tree, path: str) -> Node:
    found = tree.node_by_path(path)
    assert found is not None, path
    return found


def walk(tree: Tree, path: str) -> Node | None:
    """Resolve ``path`` name by name from the root, as FUSE lookups do."""
    current: Node | None = tree.root
    for name in path.strip("/").split("/"):
        if name and current is not None:
            current = current.child(os.fsencode(name))
    return current


def test_root_is_inode_one_and_its_own_parent(tree: Tree) -> None:
    import pyfuse3

    assert ROOT_INO == pyfuse3.ROOT_INODE
    assert tree.root.ino == ROOT_INO
    assert tree.get(ROOT_INO) is tree.root
    assert tree.root.parent is tree.root
    assert tree.root.child(b"..") is tree.root
    assert tree.root.child(b".") is tree.root
    assert tree.path_of(ROOT_INO) == "/"


def test_inode_numbers_are_dense_unique_and_deterministic(tree: Tree) -> None:
    inos = [n.ino for n in tree.iter_nodes()]
    assert inos == list(range(ROOT_INO, ROOT_INO + tree.inode_count))
    again = Tree.from_manifest(sample().manifest)
    assert [(n.ino, n.path) for n in again.iter_nodes()] == [
        (n.ino, n.path) for n in tree.iter_nodes()
    ]
    assert tree.get(0) is None
    assert tree.get(tree.inode_count + 1) is None
    with pytest.raises(KeyError):
        tree.path_of(tree.inode_count + 1)


def test_every_manifest_path_resolves_by_name(tree: Tree) -> None:
    for path in sample().manifest.entries:
        assert walk(tree, path) is node(tree, path), path


def test_implicit_parents_are_root_owned_0755_with_the_root_times(tree: Tree) -> None:
    for path in ("/usr", "/usr/bin", "/usr/lib", "/usr/share", "/var", "/home"):
        implicit = node(tree, path)
        assert implicit.kind is Kind.DIRECTORY
        assert implicit.mode == stat.S_IFDIR | IMPLICIT_DIR_MODE
        assert (implicit.uid, implicit.gid) == (0, 0)
        assert implicit.mtime_ns == T0
        assert implicit.atime_ns == T1
        assert implicit.ctime_ns == T0  # the root has no ctime: its mtime stands in


def test_implicit_parents_without_a_root_entry_have_time_zero() -> None:
    entries = {"/a/b/c": regular(b"x", mode=0o644, mtime=T0)}
    tree = Tree.from_manifest(Manifest(version=0, entries=entries))
    for path in ("/", "/a", "/a/b"):
        assert node(tree, path).mode == stat.S_IFDIR | 0o755
        assert node(tree, path).mtime_ns == 0
    assert tree.root.nlink == 3
    assert node(tree, "/a").nlink == 3
    assert node(tree, "/a/b").nlink == 2


def test_directory_nlink_is_two_plus_subdirectories(tree: Tree) -> None:
    for directory in tree.iter_nodes():
        if directory.is_dir:
            subdirs = sum(child.is_dir for _, child in directory.listing())
            assert directory.nlink == 2 + subdirs, directory.path
    assert tree.root.nlink == 2 + 5  # dev, etc, usr, var, home


def test_hardlinks_share_one_inode_with_nlink_of_all_names(tree: Tree) -> None:
    motd = node(tree, "/etc/motd")
    assert node(tree, "/usr/share/motd") is motd
    assert node(tree, "/usr/lib/motd.link") is motd
    assert walk(tree, "/usr/lib/motd.link") is motd
    assert motd.nlink == 3
    assert motd.path == "/etc/motd"
    assert (motd.uid, motd.gid, motd.size) == (3, 4, len(b"welcome\n"))
    assert motd.blobs == (regular(b"welcome\n").blobs[0],)
    assert node(tree, "/etc/hostname").nlink == 1


def test_stat_data_of_every_kind(tree: Tree) -> None:
    su = node(tree, "/usr/bin/su")
    assert su.mode == stat.S_IFREG | 0o4755
    assert stat.S_IMODE(su.mode) & stat.S_ISUID
    assert su.size == len(b"\x7fELF su")
    assert su.blocks == 1
    assert su.atime_ns == su.ctime_ns == su.mtime_ns == T0

    null = node(tree, "/dev/null")
    assert null.mode == stat.S_IFCHR | 0o666
    assert null.rdev == os.makedev(1, 3)
    assert null.size == 0
    sda = node(tree, "/dev/sda")
    assert sda.mode == stat.S_IFBLK | 0o660
    assert (os.major(sda.rdev), os.minor(sda.rdev)) == (8, 0)
    assert sda.gid == 6
    assert node(tree, "/dev/initctl").mode == stat.S_IFIFO | 0o600

    link = node(tree, "/home/user/link")
    assert link.mode == stat.S_IFLNK | 0o777
    assert link.link_target == "café".encode()
    assert link.size == len("café".encode()) == 5
    assert node(tree, "/bin").link_target == b"usr/bin"

    assert node(tree, "/var/tmp").mode == stat.S_IFDIR | 0o1777
    home = node(tree, "/home/user")
    assert (home.mode, home.uid, home.gid) == (stat.S_IFDIR | 0o700, 1000, 1000)
    assert node(tree, "/etc").ctime_ns == T1
    assert node(tree, "/etc").atime_ns == T0

    empty = node(tree, "/etc/empty")
    assert (empty.size, empty.blocks, empty.blobs) == (0, 0, ())


def test_blocks_round_up_to_512_bytes() -> None:
    sizes = [0, 1, 511, 512, 513, 1 << 20]
    entries = {
        f"/f{size}": Entry(Kind.REGULAR, mode=0o644, size=size, digest=bytes(32)) for size in sizes
    }
    tree = Tree.from_manifest(Manifest(version=0, entries=entries))
    assert [node(tree, f"/f{size}").blocks for size in sizes] == [0, 1, 1, 1, 2, 2048]


def test_content_blobs_and_xattrs(tree: Tree) -> None:
    big = node(tree, "/usr/bin/big")
    assert [chunk.size for chunk in big.blobs] == [5, 7, 3]
    assert [chunk.digest for chunk in big.blobs] == [digest(p) for p in BIG_CHUNKS]
    su = node(tree, "/usr/bin/su")
    assert set(su.xattrs) == {"security.capability", "user.note"}
    assert node(tree, "/etc/hostname").xattrs == {}
    assert node(tree, "/dev/null").blobs == ()
    assert tree.root.blobs == ()


def test_listing_is_sorted_by_name_bytes_and_matches_children(tree: Tree) -> None:
    for directory in tree.iter_nodes():
        listing = directory.listing()
        names = [name for name, _ in listing]
        assert names == sorted(names)
        if directory.is_dir:
            assert directory.listing() is listing  # computed once
            for name, child in listing:
                assert directory.child(name) is child
        else:
            assert listing == ()
    assert [name for name, _ in node(tree, "/usr/bin").listing()] == [b"big", b"su", b"tail3"]
    assert [name for name, _ in node(tree, "/home/user").listing()] == [
        "café".encode(),
        b"link",
    ]


def test_child_of_a_non_directory_and_missing_names(tree: Tree) -> None:
    hostname = node(tree, "/etc/hostname")
    assert hostname.child(b"x") is None
    assert hostname.child(b".") is None
    assert node(tree, "/etc").child(b"missing") is None
    assert node(tree, "/etc").child(b"..") is tree.root


def test_iter_files_yields_each_regular_inode_once(tree: Tree) -> None:
    files = list(tree.iter_files())
    assert len(files) == len({f.ino for f in files})
    assert {f.path for f in files} == set(sample().contents)


def test_totals_count_hardlinks_and_shared_blobs_once(tree: Tree) -> None:
    totals = tree.totals
    contents = sample().contents
    assert totals.files == len(contents)
    assert totals.bytes == sum(len(data) for data in contents.values())
    # big's 3 chunks + 5 other non-empty files, but tail3 is the same blob as big's last chunk
    assert totals.blobs == 3 + 5 - 1
    assert totals.blob_bytes == len(b"".join(contents.values())) - len(BIG_CHUNKS[2])
    assert totals.inodes == tree.inode_count
    assert totals.entries == tree.entry_count == len(sample().manifest.entries) + 6
    assert totals.directories == sum(n.is_dir for n in tree.iter_nodes())


def test_order_of_entries_does_not_matter() -> None:
    entries = dict(sample().manifest.entries)
    backwards = dict(reversed(list(entries.items())))
    tree = Tree.from_manifest(Manifest(version=1, entries=backwards))
    reference = Tree.from_manifest(sample().manifest)
    assert tree.entry_count == reference.entry_count
    assert tree.inode_count == reference.inode_count
    for path in entries:
        mine, theirs = node(tree, path), node(reference, path)
        assert (mine.path, mine.mode, mine.nlink, mine.uid, mine.size, mine.mtime_ns) == (
            theirs.path,
            theirs.mode,
            theirs.nlink,
            theirs.uid,
            theirs.size,
            theirs.mtime_ns,
        ), path
    # /home/user was first created as the parent of café, then given its own entry.
    assert node(tree, "/home/user").mode == stat.S_IFDIR | 0o700


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"/": regular(b"x", mode=0o644)}, "root"),
        ({"/a": Entry(Kind.HARDLINK, target="/missing")}, "hardlink"),
        (
            {"/d": Entry(Kind.DIRECTORY, mode=0o755), "/l": Entry(Kind.HARDLINK, target="/d")},
            "hardlink",
        ),
        (
            {
                "/f": regular(b"x", mode=0o644),
                "/l1": Entry(Kind.HARDLINK, target="/f"),
                "/l2": Entry(Kind.HARDLINK, target="/l1"),
            },
            "hardlink",
        ),
        ({"/f": regular(b"x", mode=0o644), "/f/g": regular(b"y", mode=0o644)}, "below"),
        ({"/f/g": regular(b"y", mode=0o644), "/f": regular(b"x", mode=0o644)}, "below"),
        ({"relative": regular(b"x", mode=0o644)}, "canonical"),
        ({"/a/": regular(b"x", mode=0o644)}, "canonical"),
        ({"//a": regular(b"x", mode=0o644)}, "canonical"),
        ({"/a/../b": regular(b"x", mode=0o644)}, "canonical"),
        ({"/a/./b": regular(b"x", mode=0o644)}, "canonical"),
        (
            {
                "/d/x": regular(b"x", mode=0o644),
                "/f": regular(b"y", mode=0o644),
                "/d": Entry(Kind.HARDLINK, target="/f"),
            },
            "twice",
        ),
    ],
)
def test_entries_that_cannot_form_a_tree_raise_format_error(
    entries: dict[str, Entry], message: str
) -> None:
    with pytest.raises(FormatError, match=message):
        Tree.from_manifest(Manifest(version=1, entries=entries))


# ---- random trees ----------------------------------------------------------------------

_names = st.sampled_from(["a", "b", "c", "bin", "é", "x y", "Z", "0"])
_paths = st.lists(_names, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """Random trees: directories, files, symlinks, hardlinks; parents often left implicit."""
    entries: dict[str, Entry] = {}
    for path in draw(st.lists(_paths, max_size=40, unique=True)):
        if any(p in entries and entries[p].kind is not Kind.DIRECTORY for p in _ancestors(path)):
            continue
        if any(p.startswith(path + "/") for p in entries):
            kind = Kind.DIRECTORY
        else:
            kind = draw(st.sampled_from([Kind.DIRECTORY, Kind.REGULAR, Kind.SYMLINK]))
        if kind is Kind.DIRECTORY:
            entries[path] = Entry(kind, mode=draw(st.integers(0, 0o7777)))
        elif kind is Kind.SYMLINK:
            entries[path] = Entry(kind, mode=0o777, target=draw(_paths))
        else:
            entries[path] = regular(draw(st.binary(max_size=3)), mode=0o644)
    files = [p for p, e in canonical(entries).items() if e.kind is Kind.REGULAR]
    if files:
        for index in range(draw(st.integers(0, 4))):
            link = f"/zz-link-{index}"
            entries[link] = Entry(Kind.HARDLINK, target=draw(st.sampled_from(files)))
    return Manifest(version=1, entries=canonical(entries))


def _ancestors(path: str) -> Iterator[str]:
    parts = path.split("/")[1:-1]
    for end in range(1, len(parts) + 1):
        yield "/" + "/".join(parts[:end])


@settings(max_examples=100, deadline=None)
@given(manifests())
def test_random_trees_keep_the_invariants(manifest: Manifest) -> None:
    tree = Tree.from_manifest(manifest)
    assert [n.ino for n in tree.iter_nodes()] == list(range(1, tree.inode_count + 1))
    for path, entry in manifest.entries.items():
        found = walk(tree, path)
        assert found is not None and found is tree.node_by_path(path)
        if entry.kind is Kind.HARDLINK:
            assert found.path == entry.target
        else:
            assert found.path == path and found.entry is entry
    names_per_inode: dict[int, int] = {}
    for directory in tree.iter_nodes():
        if not directory.is_dir:
            continue
        listing = directory.listing()
        assert [name for name, _ in listing] == sorted(name for name, _ in listing)
        assert directory.nlink == 2 + sum(child.is_dir for _, child in listing)
        for _, child in listing:
            names_per_inode[child.ino] = names_per_inode.get(child.ino, 0) + 1
    for n in tree.iter_nodes():
        if not n.is_dir and n.ino != ROOT_INO:
            assert n.nlink == names_per_inode[n.ino]
        elif n.ino != ROOT_INO:
            assert names_per_inode[n.ino] == 1
            assert n.parent.child(os.fsencode(n.path.rsplit("/", 1)[1])) is n
