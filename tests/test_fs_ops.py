"""The pyfuse3 Operations, called directly (no kernel): lookups and their counts, listings,
attributes, reads through a reader, read-only refusals, xattrs, and failure containment.

pyfuse3's ``RequestContext`` and ``ReaddirToken`` cannot be built from Python, so handlers
get a stand-in context, and ``pyfuse3.readdir_reply`` is replaced by a collector with a
capacity (as s3ql's tests do); pyfuse3 itself is not what is under test here.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import pytest

from ocixfs.errors import BlobNotFound, FetchTimeout
from ocixfs.image.format import Chunk
from ocixfs.image.tree import ST_BLKSIZE, Tree
from ocixfs.mount.fs import DEFAULT_FS_OPTIONS, FsOptions, Operations
from tests.treesamples import BIG, CAPABILITY, T0, T1, digest, sample


@dataclass
class Context:
    """Stands in for pyfuse3.RequestContext (a C type that Python cannot construct)."""

    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


CTX: Any = Context()  # the handlers never look inside it


class DictReader:
    """Serves blob contents from a dict, as a real reader serves verified blobs."""

    def __init__(self, blobs: dict[bytes, bytes]) -> None:
        self.blobs = blobs
        self.calls: list[tuple[tuple[Chunk, ...], int, int]] = []

    async def read(self, blobs: Sequence[Chunk], offset: int, size: int) -> bytes:
        self.calls.append((tuple(blobs), offset, size))
        content = b"".join(self.blobs[chunk.digest] for chunk in blobs)
        return content[offset : offset + size]


class FailingReader(DictReader):
    """Fails for chosen digests with chosen exceptions, serves everything else."""

    def __init__(self, blobs: dict[bytes, bytes], failures: dict[bytes, Exception]) -> None:
        super().__init__(blobs)
        self.failures = failures

    async def read(self, blobs: Sequence[Chunk], offset: int, size: int) -> bytes:
        for chunk in blobs:
            if chunk.digest in self.failures:
                raise self.failures[chunk.digest]
        return await super().read(blobs, offset, size)


@dataclass
class AccessRecorder:
    seen: list[tuple[str, int]] = field(default_factory=list)

    def note_access(self, node_path: str, ino: int) -> None:
        self.seen.append((node_path, ino))


@dataclass
class Listing:
    """Collects what readdir_reply is given; refuses entries beyond ``capacity``."""

    capacity: int = 1 << 30
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = field(default_factory=list)

    def reply(
        self, token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        assert token is self
        if len(self.entries) >= self.capacity:
            return False
        self.entries.append((name, attr, next_id))
        return True


@pytest.fixture
def listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listing]:
    current = Listing()

    def reply(token: Listing, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        return token.reply(token, name, attr, next_id)

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    yield current


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree.from_manifest(sample().manifest)


@pytest.fixture
def reader() -> DictReader:
    return DictReader(sample().blobs)


@pytest.fixture
def ops(tree: Tree, reader: DictReader) -> Operations:
    return Operations(tree, reader)


def ino(tree: Tree, path: str) -> int:
    node = tree.node_by_path(path)
    assert node is not None, path
    return node.ino


async def fuse_error(call: Any) -> int:
    """The errno of the FUSEError the awaitable raises (and nothing else may escape)."""
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    return caught.value.errno


async def lookup_path(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    attr = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    for name in path.strip("/").split("/"):
        attr = await ops.lookup(attr.st_ino, os.fsencode(name), CTX)
    return attr


async def read_all(ops: Operations, tree: Tree, path: str, size: int = 4) -> bytes:
    info = await ops.open(ino(tree, path), os.O_RDONLY, CTX)
    data = b""
    while chunk := await ops.read(info.fh, len(data), size):
        data += chunk
    await ops.release(info.fh)
    return data


# ---- lookup, getattr, lookup counts -----------------------------------------------------


async def test_lookup_resolves_names_and_counts_lookups(ops: Operations, tree: Tree) -> None:
    attr = await lookup_path(ops, "/usr/bin/su")
    assert attr.st_ino == ino(tree, "/usr/bin/su")
    assert attr.entry_timeout == attr.attr_timeout == DEFAULT_FS_OPTIONS.entry_timeout
    stats = ops.statistics()
    assert stats.lookups == 3
    assert stats.known_inodes == 3  # usr, bin, su

    await ops.forget([(ino(tree, "/usr"), 1), (ino(tree, "/usr/bin"), 1)])
    assert ops.statistics().known_inodes == 1
    await ops.forget([(attr.st_ino, 1)])
    assert ops.statistics().known_inodes == 0


async def test_lookup_of_dot_and_dotdot(ops: Operations, tree: Tree) -> None:
    etc = ino(tree, "/etc")
    assert (await ops.lookup(etc, b".", CTX)).st_ino == etc
    assert (await ops.lookup(etc, b"..", CTX)).st_ino == pyfuse3.ROOT_INODE
    assert (await ops.lookup(pyfuse3.ROOT_INODE, b"..", CTX)).st_ino == pyfuse3.ROOT_INODE
    assert ops.statistics().known_inodes == 2
    await ops.forget([(pyfuse3.ROOT_INODE, 2), (etc, 1)])
    assert ops.statistics().known_inodes == 0


async def test_negative_lookups_are_cacheable_entries(tree: Tree, reader: DictReader) -> None:
    ops = Operations(tree, reader, options=FsOptions(negative_timeout=123.0))
    attr = await ops.lookup(ino(tree, "/etc"), b"nonexistent", CTX)
    assert attr.st_ino == 0
    assert attr.entry_timeout == 123.0
    stats = ops.statistics()
    assert (stats.lookups, stats.negative_lookups, stats.known_inodes) == (1, 1, 0)
    assert stats.errors == {}


async def test_lookup_errors(ops: Operations, tree: Tree) -> None:
    assert await fuse_error(ops.lookup(ino(tree, "/etc/motd"), b"x", CTX)) == errno.ENOTDIR
    assert await fuse_error(ops.lookup(10**6, b"x", CTX)) == errno.ENOENT
    assert await fuse_error(ops.getattr(10**6, CTX)) == errno.ENOENT
    assert ops.statistics().errors == {"ENOTDIR": 1, "ENOENT": 2}


async def test_getattr_reports_full_stat_data(ops: Operations, tree: Tree) -> None:
    su = await ops.getattr(ino(tree, "/usr/bin/su"), CTX)
    assert su.st_mode == stat.S_IFREG | 0o4755
    assert (su.st_size, su.st_blocks, su.st_blksize, su.st_nlink) == (7, 1, ST_BLKSIZE, 1)
    assert su.st_mtime_ns == su.st_atime_ns == su.st_ctime_ns == T0

    root = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert root.st_mode == stat.S_IFDIR | 0o755
    assert root.st_nlink == 7
    assert (root.st_atime_ns, root.st_mtime_ns) == (T1, T0)

    null = await ops.getattr(ino(tree, "/dev/null"), CTX)
    assert null.st_mode == stat.S_IFCHR | 0o666
    assert null.st_rdev == os.makedev(1, 3)
    sda = await ops.getattr(ino(tree, "/dev/sda"), CTX)
    assert (stat.S_ISBLK(sda.st_mode), sda.st_rdev, sda.st_gid) == (True, os.makedev(8, 0), 6)
    assert stat.S_ISFIFO((await ops.getattr(ino(tree, "/dev/initctl"), CTX)).st_mode)

    link = await ops.getattr(ino(tree, "/home/user/link"), CTX)
    assert stat.S_ISLNK(link.st_mode)
    assert link.st_size == len("café".encode())
    user = await ops.getattr(ino(tree, "/home/user"), CTX)
    assert (user.st_uid, user.st_gid, stat.S_IMODE(user.st_mode)) == (1000, 1000, 0o700)
    usr = await ops.getattr(ino(tree, "/usr"), CTX)
    assert (usr.st_mode, usr.st_uid, usr.st_mtime_ns) == (stat.S_IFDIR | 0o755, 0, T0)


async def test_hardlinks_share_inode_and_nlink(ops: Operations) -> None:
    names = ("/etc/motd", "/usr/share/motd", "/usr/lib/motd.link")
    attrs = [await lookup_path(ops, name) for name in names]
    assert len({attr.st_ino for attr in attrs}) == 1
    assert {attr.st_nlink for attr in attrs} == {3}
    assert {(attr.st_uid, attr.st_gid) for attr in attrs} == {(3, 4)}


async def test_attributes_are_built_once_per_inode(ops: Operations, tree: Tree) -> None:
    first = await ops.getattr(ino(tree, "/etc/hostname"), CTX)
    again = await ops.lookup(ino(tree, "/etc"), b"hostname", CTX)
    assert first is again


# ---- directories ------------------------------------------------------------------------


async def test_readdir_lists_dot_dotdot_and_sorted_children(
    ops: Operations, tree: Tree, listing: Listing
) -> None:
    usr_bin = ino(tree, "/usr/bin")
    fh = await ops.opendir(usr_bin, CTX)
    await ops.readdir(fh, 0, listing)
    await ops.releasedir(fh)
    names = [name for name, _, _ in listing.entries]
    assert names == [b".", b"..", b"big", b"su", b"tail3"]
    inos = [attr.st_ino for _, attr, _ in listing.entries]
    assert inos[:2] == [usr_bin, ino(tree, "/usr")]
    assert inos[2:] == [ino(tree, f"/usr/bin/{n}") for n in ("big", "su", "tail3")]
    assert [next_id for _, _, next_id in listing.entries] == [1, 2, 3, 4, 5]
    # Children gained a lookup each; "." and ".." did not.
    assert ops.statistics().known_inodes == 3
    await ops.forget([(i, 1) for i in inos[2:]])
    assert ops.statistics().known_inodes == 0


async def test_readdir_of_root_reports_root_as_its_own_parent(
    ops: Operations, listing: Listing
) -> None:
    await ops.readdir(await ops.opendir(pyfuse3.ROOT_INODE, CTX), 0, listing)
    assert [attr.st_ino for _, attr, _ in listing.entries[:2]] == [1, 1]
    assert [name for name, _, _ in listing.entries[2:]] == [
        b"bin",
        b"dev",
        b"etc",
        b"home",
        b"usr",
        b"var",
    ]


@pytest.mark.parametrize("capacity", [1, 2, 3, 4, 7])
async def test_readdir_resumes_where_the_buffer_filled(
    ops: Operations, tree: Tree, listing: Listing, capacity: int
) -> None:
    fh = await ops.opendir(pyfuse3.ROOT_INODE, CTX)
    seen: list[bytes] = []
    start_id = 0
    for _ in range(20):
        listing.entries.clear()
        listing.capacity = capacity
        await ops.readdir(fh, start_id, listing)
        if not listing.entries:
            break
        seen += [name for name, _, _ in listing.entries]
        start_id = listing.entries[-1][2]
    assert seen == [b".", b"..", b"bin", b"dev", b"etc", b"home", b"usr", b"var"]
    # Only accepted children count: each child exactly once.
    assert ops.statistics().known_inodes == 6
    await ops.forget([(node.ino, 1) for _, node in tree.root.listing()])
    assert ops.statistics().known_inodes == 0


async def test_readdir_that_accepts_nothing_counts_nothing(
    ops: Operations, listing: Listing
) -> None:
    listing.capacity = 0
    await ops.readdir(pyfuse3.ROOT_INODE, 0, listing)
    await ops.readdir(pyfuse3.ROOT_INODE, 5, listing)
    assert ops.statistics().known_inodes == 0


async def test_opendir_and_readdir_refuse_non_directories(ops: Operations, tree: Tree) -> None:
    hostname = ino(tree, "/etc/hostname")
    assert await fuse_error(ops.opendir(hostname, CTX)) == errno.ENOTDIR
    assert await fuse_error(ops.opendir(10**6, CTX)) == errno.ENOENT


async def test_readlink(ops: Operations, tree: Tree) -> None:
    assert await ops.readlink(ino(tree, "/bin"), CTX) == b"usr/bin"
    assert await ops.readlink(ino(tree, "/home/user/link"), CTX) == "café".encode()
    assert await fuse_error(ops.readlink(ino(tree, "/etc/motd"), CTX)) == errno.EINVAL


# ---- open and read ----------------------------------------------------------------------


async def test_open_uses_the_inode_as_handle_and_keeps_the_cache(
    ops: Operations, tree: Tree
) -> None:
    hostname = ino(tree, "/etc/hostname")
    info = await ops.open(hostname, os.O_RDONLY, CTX)
    assert (info.fh, info.keep_cache, info.direct_io) == (hostname, True, False)
    again = await ops.open(hostname, os.O_RDONLY | os.O_NOFOLLOW, CTX)
    assert ops.statistics().open_files == 2
    await ops.release(info.fh)
    await ops.release(again.fh)
    assert ops.statistics().open_files == 0
    assert ops.statistics().opens == 2


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_CREAT])
async def test_open_for_writing_is_erofs(ops: Operations, tree: Tree, flags: int) -> None:
    assert await fuse_error(ops.open(ino(tree, "/etc/hostname"), flags, CTX)) == errno.EROFS
    assert ops.statistics().open_files == 0


async def test_open_of_a_directory_is_eisdir(ops: Operations, tree: Tree) -> None:
    assert await fuse_error(ops.open(ino(tree, "/etc"), os.O_RDONLY, CTX)) == errno.EISDIR


async def test_first_read_of_each_inode_is_noted_once(tree: Tree, reader: DictReader) -> None:
    """Reads, not opens: where the kernel opens files itself only READ reaches the daemon
    (its handle is the inode). A file opened and never read is not noted."""
    recorder = AccessRecorder()
    ops = Operations(tree, reader, access_log=recorder)
    await ops.release((await ops.open(ino(tree, "/usr/bin/big"), os.O_RDONLY, CTX)).fh)
    for path in ("/etc/hostname", "/usr/share/motd", "/etc/hostname", "/etc/motd"):
        await ops.read(ino(tree, path), 0, 4096)
        await ops.read(ino(tree, path), 1, 10)
    assert recorder.seen == [
        ("/etc/hostname", ino(tree, "/etc/hostname")),
        ("/etc/motd", ino(tree, "/etc/motd")),  # the canonical name of the hardlink group
    ]


async def test_a_failing_access_log_does_not_fail_the_open(
    tree: Tree, reader: DictReader, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def note_access(self, node_path: str, ino: int) -> None:
            raise OSError("profile disk full")

    ops = Operations(tree, reader, access_log=Broken())
    info = await ops.open(ino(tree, "/etc/hostname"), os.O_RDONLY, CTX)
    assert await ops.read(info.fh, 0, 100) == b"ocix\n"
    assert ops.statistics().failures == {"OSError": 1}
    assert "profile disk full" in caplog.text


@pytest.mark.parametrize("path", list(sample().contents))
async def test_read_whole_files_in_small_pieces(ops: Operations, tree: Tree, path: str) -> None:
    assert await read_all(ops, tree, path) == sample().contents[path]


async def test_read_every_range_across_chunk_boundaries(
    ops: Operations, tree: Tree, reader: DictReader
) -> None:
    big = ino(tree, "/usr/bin/big")
    fh = (await ops.open(big, os.O_RDONLY, CTX)).fh
    for offset in range(len(BIG) + 3):
        for size in range(0, len(BIG) + 3):
            assert await ops.read(fh, offset, size) == BIG[offset : offset + size], (offset, size)
    # The reader only ever sees ranges inside the file, with the file's chunk list.
    for blobs, offset, size in reader.calls:
        assert [c.size for c in blobs] == [5, 7, 3]
        assert size > 0 and offset + size <= len(BIG)


async def test_reads_at_and_past_eof_return_nothing_without_the_reader(
    ops: Operations, tree: Tree, reader: DictReader
) -> None:
    hostname = ino(tree, "/etc/hostname")
    assert await ops.read(hostname, 5, 4096) == b""
    assert await ops.read(hostname, 1 << 40, 4096) == b""
    assert await ops.read(ino(tree, "/etc/empty"), 0, 4096) == b""
    assert reader.calls == []
    assert await ops.read(hostname, 3, 4096) == b"x\n"
    assert reader.calls[-1][1:] == (3, 2)
    stats = ops.statistics()
    assert (stats.reads, stats.read_bytes) == (4, 2)


async def test_read_of_an_unknown_handle_is_ebadf(ops: Operations) -> None:
    assert await fuse_error(ops.read(10**6, 0, 10)) == errno.EBADF


# ---- failures -----------------------------------------------------------------------------


async def test_reader_failures_become_eio_and_the_rest_keeps_working(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = sample().blobs
    su, motd = digest(b"\x7fELF su"), digest(b"welcome\n")
    reader = FailingReader(
        blobs,
        {su: BlobNotFound(f"blob {su.hex()} not found on any store"), motd: RuntimeError("bug")},
    )
    ops = Operations(tree, reader)
    caplog.set_level(logging.WARNING, logger="ocixfs")
    for _ in range(3):
        assert await fuse_error(ops.read(ino(tree, "/usr/bin/su"), 0, 100)) == errno.EIO
    assert await fuse_error(ops.read(ino(tree, "/usr/lib/motd.link"), 0, 100)) == errno.EIO
    # Everything else still answers.
    assert await read_all(ops, tree, "/etc/hostname") == b"ocix\n"
    assert (await lookup_path(ops, "/usr/bin/big")).st_size == len(BIG)

    stats = ops.statistics()
    assert stats.failures == {"BlobNotFound": 3, "RuntimeError": 1}
    assert stats.errors == {"EIO": 4}

    records = [
        r for r in caplog.records if r.name == "ocixfs.mount.fs" and r.levelno >= logging.WARNING
    ]
    assert len(records) == 4  # one line per failure; the log handler's filter rate-limits
    assert all("\n" not in r.getMessage() for r in records)
    assert records[0].levelno == logging.WARNING
    assert records[0].getMessage() == f"read /usr/bin/su: blob {su.hex()} not found on any store"
    assert {r.msg for r in records[:3]} == {records[0].msg}  # one rate-limit key per kind
    assert records[3].levelno == logging.ERROR
    assert records[3].getMessage() == "read /etc/motd: unexpected RuntimeError: bug"


async def test_a_reader_returning_too_few_bytes_is_eio(tree: Tree) -> None:
    class ShortReader:
        async def read(self, blobs: Sequence[Chunk], offset: int, size: int) -> bytes:
            return b"x" * (size - 1)

    ops = Operations(tree, ShortReader())
    assert await fuse_error(ops.read(ino(tree, "/etc/hostname"), 0, 5)) == errno.EIO
    assert ops.statistics().failures == {"RuntimeError": 1}


async def test_an_exception_that_cannot_even_be_printed_is_still_eio(tree: Tree) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    hostname = digest(b"ocix\n")
    ops = Operations(tree, FailingReader({}, {hostname: Unprintable()}))
    assert await fuse_error(ops.read(ino(tree, "/etc/hostname"), 0, 5)) == errno.EIO
    assert ops.statistics().failures == {"Unprintable": 1}


async def test_timeouts_are_eio_too(tree: Tree) -> None:
    hostname = digest(b"ocix\n")
    ops = Operations(tree, FailingReader({}, {hostname: FetchTimeout("deadline passed")}))
    assert await fuse_error(ops.read(ino(tree, "/etc/hostname"), 0, 5)) == errno.EIO


_HANDLERS = [
    name
    for name, member in inspect.getmembers(pyfuse3.Operations, inspect.iscoroutinefunction)
    if not name.startswith("_")
]


@pytest.mark.parametrize("name", _HANDLERS)
async def test_no_exception_but_fuse_error_escapes_any_handler(
    ops: Operations, listing: Listing, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """Garbage arguments (as a bug would produce) give FUSEError, never anything else."""
    handler = getattr(ops, name)
    arity = len(inspect.signature(handler).parameters)
    for garbage in (None, -1, b"\xff" * 300, object()):
        with contextlib.suppress(pyfuse3.FUSEError):
            await handler(*[garbage] * arity)
    if name == "forget":
        await ops.forget([(1, 5), (10**6, 1), ("x", None)])  # type: ignore[list-item]
        ops.destroy()


async def test_forget_and_destroy_never_raise(ops: Operations, tree: Tree) -> None:
    await ops.lookup(pyfuse3.ROOT_INODE, b"etc", CTX)
    await ops.forget([(ino(tree, "/etc"), 5), (10**6, 1)])  # more than counted, unknown
    await ops.forget(None)  # type: ignore[arg-type]
    await ops.lookup(pyfuse3.ROOT_INODE, b"etc", CTX)
    assert ops.statistics().known_inodes == 1
    ops.destroy()
    assert ops.statistics().known_inodes == 0


# ---- read-only, xattrs, statfs, access ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("setattr", (1, pyfuse3.EntryAttributes(), None, None, CTX)),
        ("mknod", (1, b"n", stat.S_IFIFO | 0o644, 0, CTX)),
        ("mkdir", (1, b"d", 0o755, CTX)),
        ("unlink", (1, b"bin", CTX)),
        ("rmdir", (1, b"etc", CTX)),
        ("symlink", (1, b"s", b"t", CTX)),
        ("rename", (1, b"bin", 1, b"nib", 0, CTX)),
        ("link", (2, 1, b"l", CTX)),
        ("create", (1, b"f", 0o644, os.O_WRONLY, CTX)),
        ("write", (2, 0, b"data")),
        ("setxattr", (1, b"user.x", b"v", CTX)),
        ("removexattr", (1, b"user.x", CTX)),
    ],
)
async def test_every_modification_is_erofs(ops: Operations, name: str, args: tuple[Any]) -> None:
    assert await fuse_error(getattr(ops, name)(*args)) == errno.EROFS
    assert ops.statistics().errors == {"EROFS": 1}


async def test_xattrs(ops: Operations, tree: Tree) -> None:
    su = ino(tree, "/usr/bin/su")
    assert await ops.getxattr(su, b"security.capability", CTX) == CAPABILITY
    assert sorted(await ops.listxattr(su, CTX)) == [b"security.capability", b"user.note"]
    assert await fuse_error(ops.getxattr(su, b"user.missing", CTX)) == errno.ENODATA
    assert pyfuse3.ENOATTR == errno.ENODATA
    hostname = ino(tree, "/etc/hostname")
    assert list(await ops.listxattr(hostname, CTX)) == []
    assert await fuse_error(ops.getxattr(hostname, b"user.note", CTX)) == errno.ENODATA
    assert await fuse_error(ops.listxattr(10**6, CTX)) == errno.ENOENT
    stats = ops.statistics()
    assert stats.xattr_misses == 2
    assert stats.errors == {"ENOENT": 1}  # a missing xattr is an answer, not an error


async def test_statfs_describes_the_whole_image(ops: Operations, tree: Tree) -> None:
    stats = await ops.statfs(CTX)
    file_bytes = sum(len(data) for data in sample().contents.values())
    assert stats.f_frsize == stats.f_bsize
    assert stats.f_blocks == -(-file_bytes // stats.f_frsize)
    assert (stats.f_bfree, stats.f_bavail, stats.f_ffree, stats.f_favail) == (0, 0, 0, 0)
    assert stats.f_files == tree.inode_count
    assert stats.f_namemax == 255


async def test_access(ops: Operations, tree: Tree) -> None:
    hostname = ino(tree, "/etc/hostname")
    assert await ops.access(hostname, os.R_OK, CTX) is True
    assert await ops.access(hostname, os.F_OK, CTX) is True
    assert await ops.access(ino(tree, "/usr/bin/su"), os.R_OK | os.X_OK, CTX) is True
    assert await fuse_error(ops.access(hostname, os.W_OK, CTX)) == errno.EROFS
    assert await fuse_error(ops.access(10**6, os.R_OK, CTX)) == errno.ENOENT


async def test_statistics_snapshot_is_frozen_and_plain(ops: Operations, tree: Tree) -> None:
    await read_all(ops, tree, "/etc/hostname")
    snapshot = ops.statistics()
    with pytest.raises(TypeError):
        snapshot.errors["EIO"] = 1  # type: ignore[index]
    await ops.lookup(pyfuse3.ROOT_INODE, b"etc", CTX)
    assert snapshot.lookups == 0
    plain = snapshot.as_dict()
    assert plain["reads"] == 3 and plain["read_bytes"] == 5 and plain["opens"] == 1
    assert type(plain["errors"]) is dict
