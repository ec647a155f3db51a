"""The host's index of the images it has loaded: an image seen before loads in milliseconds.

``load_tree(data, digest, cache_dir)`` is the one way a mount turns manifest bytes into
its inode tree. The first time, the manifest is decoded and validated in full and the
tree built (``image.format``, ``image.tree``); the tree is then packed
(``image.packed``) and kept as ``CACHE/index/<hex of the manifest digest>.index`` (a
mount uses ``open_tree`` and its daemon calls ``write_index`` once the mount has been quiet
for a second, or as it exits, so the first mount of a big image does not wait for the
write, nor does its start-up). The
next load of the same bytes (the digest is their BLAKE3, computed anyway to pin them)
unpacks that file instead: no decode, no validation, nodes made on first use.

The file is trusted only as far as it is authenticated, and a file that fails a check
is rebuilt from the manifest, never used: it must be a regular file (opened with
``O_NOFOLLOW | O_NONBLOCK``: no symlink, FIFO or device) owned by this user, in the
cache's private ``index/`` directory (``safefs.private_directory``); its header must
carry the magic, this build's format and pack versions, the byte order, and the
manifest digest asked for; and the keyed BLAKE3 of the header and payload, under this
cache's host key, must be the MAC the header ends with. The host key is 32 random bytes
in ``index/key`` (``HOST_KEY``), a regular file of this user with mode 0600, made once
(a racing maker's key is never replaced: it is linked into place, not renamed). Only
this code, run by this user, can write a file that passes: so a damaged file (a flipped
bit, a truncation), one of another cache or host, or one written by anybody without the
key is refused, and an authenticated payload is the output of ``image.packed.pack`` and
is unpacked without re-checking its bounds (``unpack(trusted=True)``: for 100,000
entries that check cost 90 ms of a 100 ms load). Whoever can read the key could also
write the cache's files directly, so the key adds no new party to trust.
``ocixfs cache fsck`` checks the MAC and the payload's bounds both. Writers go through
``safefs.write_atomically`` (a random ``O_EXCL`` name, then ``rename``), so readers see
a whole file or none, whoever wins a race.

Bounded by count: after writing one, the least recently used files beyond
``KEEP_INDEXES`` are removed (a load touches its file's mtime). ``ocixfs cache fsck``
checks each file the same way and removes bad ones and strays (``check_indexes``).

Nothing here fails a load: an unusable cache or index is logged and the manifest decoded.

The same directory keeps each image's EROFS metadata image (``image.erofs``), for the
kernel to serve a stacked mount's metadata (``mount.stacking``):
``<hex>.<uid shift>.<gid shift>.erofs``. Its first ``BOOT_SIZE`` bytes, which the kernel
never reads, hold the header that authenticates it the same way (magic, this build,
digest, shifts, length, and the keyed BLAKE3 of those and of the image after the boot
area). ``open_metadata_image`` hands the daemon a descriptor of an authenticated one:
the kernel parses what it mounts, so a file nobody with the key wrote is never mounted.
Like the index, it is written by the daemon of the first mount once that mount is quiet
(``write_metadata_image``; for 100,000 entries it takes about 1.5 s), without
``fsync``: a file torn by a crash fails its check and is written again.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import secrets
import stat
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from ocixfs import __version__
from ocixfs.cache.layout import INDEX, TOUCH_INTERVAL
from ocixfs.errors import FormatError, UnsafePathError
from ocixfs.image.erofs import BOOT_SIZE, Unrepresentable, metadata_image
from ocixfs.image.format import decode
from ocixfs.image.packed import PACK_VERSION, pack, unpack
from ocixfs.image.tree import Tree
from ocixfs.safefs import private_directory, write_atomically

__all__ = [
    "FORMAT_VERSION",
    "HOST_KEY",
    "KEEP_INDEXES",
    "LOADS",
    "IndexCheck",
    "check_indexes",
    "index_path",
    "indexed_tree",
    "LoadedTree",
    "load_tree",
    "open_metadata_image",
    "open_tree",
    "read_index",
    "write_index",
    "write_metadata_image",
]

log = logging.getLogger(__name__)

MAGIC = b"OCIXIDX\n"
META_MAGIC = b"OCIXMETA"
META_SUFFIX = ".erofs"
# magic, ocixfs version, digest, uid shift, gid shift, image length, then the MAC
_META_HEADER = struct.Struct("<8s16s32sIIQ32s")
FORMAT_VERSION = 2
KEEP_INDEXES = 32
SUFFIX = ".index"
HOST_KEY = "key"
"""The name of the host key in ``CACHE/index`` (module doc)."""
_KEY_SIZE = 32
# magic, format version, pack version, byte order, zeros, ocixfs version, digest, payload
# length, then the MAC: keyed BLAKE3 of everything before it and the payload
_HEADER = struct.Struct("<8sIIB7s16s32sQ32s")
_MAC_SIZE = 32
_RESERVED = bytes(7)
_BYTE_ORDER = 1 if sys.byteorder == "little" else 2
_BUILD = __version__.encode()[:16]
_MAX_INDEX_BYTES = 1 << 32


@dataclass(slots=True)
class Loads:
    """What ``load_tree`` did in this process: trees from an index, from the manifest,
    and indexes refused (each then rebuilt)."""

    from_index: int = 0
    from_manifest: int = 0
    refused: int = 0


LOADS = Loads()


def index_path(cache_dir: Path, digest: str) -> Path:
    """Where the index of the manifest with ``digest`` (``b3:<hex>``) lives."""
    return cache_dir / INDEX / f"{digest.removeprefix('b3:')}{SUFFIX}"


@dataclass(frozen=True, slots=True)
class LoadedTree:
    """What ``open_tree`` found: the tree, and whether it came from this host's index
    (if not, ``write_index`` keeps it for the next load)."""

    tree: Tree
    from_index: bool


def load_tree(data: bytes, digest: str, cache_dir: Path | None, *, source: str) -> Tree:
    """The inode tree of the manifest ``data`` whose digest is ``digest`` (the caller
    computed it from ``data``): from this host's index when it has a good one, else
    decoded and validated (``FormatError`` names ``source``) and then indexed.
    ``cache_dir`` None: no index."""
    loaded = open_tree(data, digest, cache_dir, source=source)
    if not loaded.from_index and cache_dir is not None:
        write_index(cache_dir, digest, loaded.tree)
    return loaded.tree


def open_tree(data: bytes, digest: str, cache_dir: Path | None, *, source: str) -> LoadedTree:
    """``load_tree`` without the index write: a mount serves first and indexes after
    (``write_index`` from the daemon), so the first mount of a big image does not wait for
    it."""
    tree = indexed_tree(digest, cache_dir)
    if tree is not None:
        return LoadedTree(tree, from_index=True)
    tree = Tree.from_manifest(decode(data, source=source))
    LOADS.from_manifest += 1
    return LoadedTree(tree, from_index=False)


def indexed_tree(digest: str, cache_dir: Path | None) -> Tree | None:
    """The tree of the manifest ``digest`` from the host's index, if there is one and it
    passes every check (a damaged or foreign one is logged and counted, never used)."""
    directory = _index_directory(cache_dir, create=False)
    if directory is None:
        return None
    path = directory / index_path(Path(), digest).name
    try:
        tree = read_index(path, digest)
    except FileNotFoundError:
        return None
    except (OSError, FormatError, UnsafePathError) as exc:
        LOADS.refused += 1
        log.info("index %s not used (%s); rebuilding it from the manifest", path, exc)
        return None
    LOADS.from_index += 1
    with contextlib.suppress(OSError):
        os.utime(path, follow_symlinks=False)
    return tree


def read_index(path: Path, digest: str, *, check: bool = False) -> Tree:
    """The tree in the index file ``path`` if every check passes (module doc), under the
    host key beside it; ``check`` also re-checks the payload's bounds (what ``fsck``
    does; a load trusts an authenticated payload). Raises ``FileNotFoundError`` (no such
    index), ``OSError``, ``UnsafePathError`` or ``FormatError`` (a missing key too)."""
    fd = _open_private(path)
    try:
        size = os.fstat(fd).st_size
        if size > _MAX_INDEX_BYTES:
            raise FormatError(f"index: {size} bytes")
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    try:
        key = _read_key(path.parent / HOST_KEY)
    except FileNotFoundError:
        raise FormatError("index: no host key") from None
    return unpack(_payload(data, digest, key), trusted=not check)


def _open_private(path: Path) -> int:
    """A descriptor of ``path`` if it is a regular file of this user (no symlink
    followed, no wait on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symlink") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafePathError(f"{path}: not a regular file of uid {os.geteuid()}")
    return fd


def _read_key(path: Path) -> bytes:
    """The host key at ``path``: a regular file of this user, readable by nobody else,
    of exactly ``_KEY_SIZE`` bytes. Raises ``FileNotFoundError``, ``OSError``,
    ``UnsafePathError`` or ``FormatError``."""
    fd = _open_private(path)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise UnsafePathError(f"{path}: mode {st.st_mode & 0o777:o}, not private")
        key = os.pread(fd, _KEY_SIZE + 1, 0)
    finally:
        os.close(fd)
    if len(key) != _KEY_SIZE:
        raise FormatError(f"host key: {len(key)} bytes, not {_KEY_SIZE}")
    return key


def _host_key(directory: Path) -> bytes:
    """The host key of the index ``directory``, made if there is none; an unusable one
    (not a private regular file of this user of the right size) is replaced, which
    only makes the indexes written under it rebuilt. Raises ``OSError``."""
    path = directory / HOST_KEY
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    except (FormatError, UnsafePathError, OSError) as exc:
        log.warning("replacing the image index key %s: %s", path, exc)
        if not os.path.isdir(path) or os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    tmp = directory / f".{HOST_KEY}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(_KEY_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another writer's key came first
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    try:
        return _read_key(path)
    except (FormatError, UnsafePathError) as exc:
        raise OSError(errno.EPERM, f"unusable key {path}: {exc}") from None


def _mac(key: bytes, header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    """The keyed BLAKE3 of an index file's header (without its MAC) and payload."""
    hasher = blake3.blake3(key=key)  # one thread: a thread pool would not survive a fork
    hasher.update(header)
    hasher.update(payload)
    return hasher.digest()


def _payload(data: bytes, digest: str, key: bytes) -> memoryview:
    """The payload of an index file's bytes, once the header matched and the MAC under
    ``key`` verified (module doc)."""
    if len(data) < _HEADER.size:
        raise FormatError("index: truncated header")
    magic, version, pack_version, order, reserved, build, raw_digest, length, mac = (
        _HEADER.unpack_from(data))
    if magic != MAGIC:
        raise FormatError("index: not an index file")
    build = build.rstrip(b"\0")
    if (version, pack_version, order, reserved, build) != (
            FORMAT_VERSION, PACK_VERSION, _BYTE_ORDER, _RESERVED, _BUILD):
        shown = build.decode(errors="replace")
        raise FormatError(f"index: written by another version ({version}/{pack_version}/"
                          f"{shown})")
    if raw_digest.hex() != digest.removeprefix("b3:"):
        raise FormatError(f"index: of another manifest (b3:{raw_digest.hex()})")
    view = memoryview(data)
    payload = view[_HEADER.size:]
    if len(payload) != length:
        raise FormatError(f"index: {len(payload)} bytes of payload, header says {length}")
    if not hmac.compare_digest(_mac(key, view[:_HEADER.size - _MAC_SIZE], payload), mac):
        raise FormatError("index: not authenticated by this host's key")
    return payload


def _index_file(digest: str, payload: bytes, key: bytes) -> bytes:
    """An index file: the header, its MAC under ``key`` and ``payload``."""
    fields = (MAGIC, FORMAT_VERSION, PACK_VERSION, _BYTE_ORDER, _RESERVED, _BUILD,
              bytes.fromhex(digest.removeprefix("b3:")), len(payload))
    unsigned = _HEADER.pack(*fields, bytes(_MAC_SIZE))[:-_MAC_SIZE]
    return unsigned + _mac(key, unsigned, payload) + payload


def _index_directory(cache_dir: Path | None, *, create: bool) -> Path | None:
    """``CACHE/index`` once checked private (made if ``create``), or None when there is
    none or it is unusable (logged)."""
    if cache_dir is None:
        return None
    directory = cache_dir / INDEX
    if not create and not os.path.isdir(directory):
        return None
    try:
        if create:
            private_directory(cache_dir, what="cache directory")
        return private_directory(directory, what="cache index directory")
    except (OSError, UnsafePathError) as exc:
        log.warning("not using the image index in %s: %s", directory, exc)
        return None


def write_index(cache_dir: Path, digest: str, tree: Tree) -> None:
    """Pack and store ``tree`` (atomically) as the index of ``digest``, then trim the
    directory. Blocking (a worker thread in a daemon); failures are logged, never raised."""
    directory = _index_directory(cache_dir, create=True)
    if directory is None:
        return
    try:
        write_atomically(directory / index_path(Path(), digest).name,
                         _index_file(digest, pack(tree), _host_key(directory)), mode=0o600)
        _trim(directory)
    except OSError as exc:
        log.warning("cannot write the image index in %s: %s", directory, exc.strerror)


def _trim(directory: Path, suffix: str = SUFFIX) -> None:
    """Remove the least recently used files ending in ``suffix`` beyond ``KEEP_INDEXES``."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
    found.sort(reverse=True)
    for _, path in found[KEEP_INDEXES:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def open_metadata_image(cache_dir: Path, digest: str, *, uid_shift: int = 0,
                        gid_shift: int = 0, verified: Path | None = None) -> int | None:
    """A read-only descriptor of this host's authenticated EROFS metadata image of the
    manifest ``digest`` (module doc), or None when there is none (or a bad one, logged).
    ``verified``: a private directory that lasts no longer than this boot (the runtime
    directory's), where each image that passed is noted by this boot's id, its device,
    inode and size, so that a later mount this boot opens it without reading it whole
    (for 100,000 entries, 22 MB). Our writers always make a new inode; a note of another
    boot, or of a file since replaced, is not one. Blocking."""
    directory = _index_directory(cache_dir, create=False)
    if directory is None:
        return None
    try:
        key = _read_key(directory / HOST_KEY)
    except (OSError, FormatError, UnsafePathError):
        return None
    path = _metadata_image_path(directory, digest, uid_shift, gid_shift)
    return _authenticated_image(path, (digest, uid_shift, gid_shift), key, verified)


def write_metadata_image(cache_dir: Path, digest: str, tree: Tree, *, uid_shift: int = 0,
                         gid_shift: int = 0) -> None:
    """Write the EROFS metadata image of ``tree`` (module doc), then trim. Blocking (a
    worker thread in a daemon); failures, and trees EROFS cannot hold, are logged, never
    raised."""
    directory = _index_directory(cache_dir, create=True)
    if directory is None:
        return
    try:
        key = _host_key(directory)
        image = metadata_image(tree, uid_shift=uid_shift, gid_shift=gid_shift)
        image[:BOOT_SIZE] = _meta_boot(image, (digest, uid_shift, gid_shift), key)
        write_atomically(_metadata_image_path(directory, digest, uid_shift, gid_shift), image,
                         mode=0o600, sync=False)
        _trim(directory, META_SUFFIX)
    except Unrepresentable as exc:
        log.info("no metadata image for %s: %s", digest, exc)
    except OSError as exc:
        log.warning("cannot write the metadata image in %s: %s", directory, exc.strerror)


def _metadata_image_path(directory: Path, digest: str, uid_shift: int, gid_shift: int) -> Path:
    return directory / f"{digest.removeprefix('b3:')}.{uid_shift}.{gid_shift}{META_SUFFIX}"


def _authenticated_image(path: Path, header: tuple[str, int, int], key: bytes,
                         verified: Path | None = None) -> int | None:
    """A descriptor of the metadata image at ``path`` if it passes its check (or was
    noted in ``verified`` as passed this boot: ``open_metadata_image``), else None (a bad
    one is logged). A file last touched over an hour ago is touched, for trimming."""
    try:
        fd = _open_private(path)
    except FileNotFoundError:
        return None
    except UnsafePathError as exc:
        log.warning("rebuilding the metadata image: %s", exc)
        return None
    try:
        st = os.fstat(fd)
        note = f"{_boot_id()} {st.st_dev} {st.st_ino} {st.st_size}\n".encode()
        if verified is None or _small_file(verified / path.name) != note:
            image = bytearray(st.st_size)
            if os.readv(fd, [image]) != st.st_size or bytes(image[:BOOT_SIZE]) != _meta_boot(
                    image, header, key):
                raise FormatError(f"{path}: not authenticated by this host's key")
            if verified is not None:
                _note_verified(verified, path.name, note)
        if time.time() - st.st_mtime > TOUCH_INTERVAL:
            with contextlib.suppress(OSError):
                os.utime(fd)
    except (OSError, FormatError) as exc:
        os.close(fd)
        log.warning("rebuilding the metadata image: %s", exc)
        return None
    return fd


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            return boot.read().strip()
    except OSError:
        return secrets.token_hex(16)  # unknown: no note ever matches


def _small_file(path: Path) -> bytes | None:
    try:
        fd = _open_private(path)
    except (OSError, UnsafePathError):
        return None
    try:
        return os.read(fd, 256)
    finally:
        os.close(fd)


def _note_verified(directory: Path, name: str, note: bytes) -> None:
    try:
        private_directory(directory, what="verified metadata images directory")
        write_atomically(directory / name, note, mode=0o600, sync=False)
    except (OSError, UnsafePathError) as exc:
        log.info("cannot note a verified metadata image in %s: %s", directory, exc)


def _meta_boot(image: bytes | bytearray, header: tuple[str, int, int], key: bytes) -> bytes:
    """The boot area that authenticates ``image`` (all of it past ``BOOT_SIZE``)."""
    digest, uid_shift, gid_shift = header
    unsigned = _META_HEADER.pack(META_MAGIC, _BUILD, bytes.fromhex(digest.removeprefix("b3:")),
                                 uid_shift, gid_shift, len(image), bytes(_MAC_SIZE))
    unsigned = unsigned[:-_MAC_SIZE]
    mac = _mac(key, unsigned, memoryview(image)[BOOT_SIZE:])
    return (unsigned + mac).ljust(BOOT_SIZE, b"\0")


@dataclass(frozen=True, slots=True)
class IndexCheck:
    """``check_indexes``: index files that passed, and files that did not (bad indexes,
    anything else in ``index/``; removed unless a dry run)."""

    good: int
    bad: tuple[str, ...]


def check_indexes(cache_dir: Path, *, remove: bool = True) -> IndexCheck:
    """Check every file in ``CACHE/index`` as a load would (its name gives the digest),
    and each payload's bounds too; remove those that fail, leftover temporary files and
    an unusable host key (the key itself is neither good nor bad). Raises ``OSError``."""
    directory = cache_dir / INDEX
    if not os.path.isdir(directory) or os.path.islink(directory):
        return IndexCheck(0, ())
    good, bad = 0, []
    with os.scandir(directory) as entries:
        names = [entry.name for entry in entries]
    for name in sorted(names):
        path = directory / name
        try:
            if name == HOST_KEY:
                _read_key(path)
                continue
            if name.endswith(META_SUFFIX):
                _check_metadata_image(path, name)
                good += 1
                continue
            if not name.endswith(SUFFIX):
                raise FormatError("not an index")
            read_index(path, "b3:" + name.removesuffix(SUFFIX), check=True)
            good += 1
        except (OSError, FormatError, UnsafePathError):
            bad.append(str(path))
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    if os.path.isdir(path) and not os.path.islink(path):
                        continue  # a directory there is only reported
                    os.unlink(path)
    return IndexCheck(good, tuple(bad))


def _check_metadata_image(path: Path, name: str) -> None:
    """Raise ``FormatError`` unless the metadata image at ``path`` passes its check."""
    try:
        hexdigest, uid_shift, gid_shift = name.removesuffix(META_SUFFIX).split(".")
        header = ("b3:" + hexdigest, int(uid_shift), int(gid_shift))
        key = _read_key(path.parent / HOST_KEY)
    except ValueError:
        raise FormatError("not a metadata image name") from None
    fd = _authenticated_image(path, header, key)
    if fd is None:
        raise FormatError("not authenticated")
    os.close(fd)
