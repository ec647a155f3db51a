"""Test helpers that make images the way real tools do: tar layers, OCI image layouts,
docker archives and root file system trees, plus snapshots to compare trees with manifests.

Everything here writes real files with the standard library (tarfile, json, hashlib); the
layouts are the ones skopeo/umoci write, so ``umoci unpack`` accepts them.

    layer = tar_bytes([directory("etc"), file("etc/hosts", b"127.0.0.1 localhost\\n")])
    layout = write_oci_layout(tmp_path / "oci", [layer], ref="latest")
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import zstandard

from ocixfs.image.format import Entry, Kind, Manifest
from ocixfs.store.layout import blob_path

__all__ = [
    "CAP_NET_RAW",
    "MTIME",
    "FileState",
    "TarEntry",
    "block_device",
    "char_device",
    "directory",
    "fifo",
    "file",
    "hardlink",
    "make_rootfs",
    "manifest_content",
    "opaque",
    "snapshot_dir",
    "snapshot_manifest",
    "symlink",
    "tar_bytes",
    "whiteout",
    "write_docker_archive",
    "write_oci_layout",
]

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    None: "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
# A version-2 file capability granting cap_net_raw (what `setcap cap_net_raw+ep` writes).
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


# -- tar entries --------------------------------------------------------------------------


@dataclass
class TarEntry:
    """One tar member: its header and, for regular files, its content."""

    info: tarfile.TarInfo
    data: bytes | None = None


def _info(name: str, kind: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: float | str = MTIME, xattrs: Mapping[str, bytes] | None = None,
          uname: str = "", gname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname, info.gname = uname, gname
    pax: dict[str, str] = {}
    if isinstance(mtime, str):  # a PAX time record, e.g. "1700000000.123456789"
        info.mtime = int(float(mtime))
        pax["mtime"] = mtime
    else:
        info.mtime = mtime
    for key, value in (xattrs or {}).items():
        # tarfile writes PAX values as UTF-8; surrogateescape carries arbitrary bytes.
        pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def file(name: str, data: bytes = b"", *, mode: int = 0o644, **meta: object) -> TarEntry:
    info = _info(name, tarfile.REGTYPE, mode=mode, **meta)  # type: ignore[arg-type]
    info.size = len(data)
    return TarEntry(info, data)


def directory(name: str, *, mode: int = 0o755, **meta: object) -> TarEntry:
    return TarEntry(_info(name, tarfile.DIRTYPE, mode=mode, **meta))  # type: ignore[arg-type]


def symlink(name: str, target: str, **meta: object) -> TarEntry:
    info = _info(name, tarfile.SYMTYPE, mode=0o777, **meta)  # type: ignore[arg-type]
    info.linkname = target
    return TarEntry(info)


def hardlink(name: str, target: str) -> TarEntry:
    info = _info(name, tarfile.LNKTYPE, mode=0o644)
    info.linkname = target
    return TarEntry(info)


def char_device(name: str, major: int, minor: int, *, mode: int = 0o666,
                **meta: object) -> TarEntry:
    info = _info(name, tarfile.CHRTYPE, mode=mode, **meta)  # type: ignore[arg-type]
    info.devmajor, info.devminor = major, minor
    return TarEntry(info)


def block_device(name: str, major: int, minor: int, *, mode: int = 0o660,
                 **meta: object) -> TarEntry:
    info = _info(name, tarfile.BLKTYPE, mode=mode, **meta)  # type: ignore[arg-type]
    info.devmajor, info.devminor = major, minor
    return TarEntry(info)


def fifo(name: str, *, mode: int = 0o644, **meta: object) -> TarEntry:
    return TarEntry(_info(name, tarfile.FIFOTYPE, mode=mode, **meta))  # type: ignore[arg-type]


def whiteout(path: str) -> TarEntry:
    """The entry that deletes ``path`` from lower layers."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def opaque(directory_path: str) -> TarEntry:
    """The entry that hides everything lower layers put in ``directory_path``."""
    return file(f"{directory_path.rstrip('/')}/.wh..wh..opq")


def tar_bytes(entries: Iterable[TarEntry], *, compression: str | None = None) -> bytes:
    """A PAX tar archive of ``entries``, optionally gzip- or zstd-compressed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as archive:
        for entry in entries:
            archive.addfile(entry.info, io.BytesIO(entry.data) if entry.data is not None else None)
    return compress(buffer.getvalue(), compression)


def compress(data: bytes, compression: str | None) -> bytes:
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise ValueError(compression)


# -- image archives -----------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _uncompressed(layer: bytes) -> bytes:
    """The layer's tar (for its diff_id); a deliberately broken layer is taken as is."""
    try:
        if layer[:2] == b"\x1f\x8b":
            return gzip.decompress(layer)
        if layer[:4] == b"\x28\xb5\x2f\xfd":
            return zstandard.ZstdDecompressor().decompressobj().decompress(layer)
    except (EOFError, OSError, zstandard.ZstdError):
        pass
    return layer


def _compression_of(layer: bytes) -> str | None:
    if layer[:2] == b"\x1f\x8b":
        return "gzip"
    if layer[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


def _config(layers: Sequence[bytes]) -> bytes:
    return json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers",
                   "diff_ids": [_sha256(_uncompressed(layer)) for layer in layers]},
    }, sort_keys=True).encode()


def write_oci_layout(root: Path, layers: Sequence[bytes], *, ref: str | None = "latest",
                     media_types: Sequence[str] | None = None, platform_index: bool = False,
                     extra_refs: Sequence[str] = ()) -> Path:
    """Write (or add to) an OCI image layout at ``root`` holding one image of ``layers``.

    Media types follow each layer's compression unless given. ``platform_index`` wraps
    the manifest in an image index with an arm64 decoy next to it. ``extra_refs`` adds
    more names for the same image. Returns ``root``.
    """
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _sha256(data)
        (blobs / digest.partition(":")[2]).write_bytes(data)
        return digest

    config = _config(layers)
    types = list(media_types) if media_types else [LAYER_TYPES[_compression_of(x)]
                                                   for x in layers]
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": t, "digest": put(x), "size": len(x)}
                   for t, x in zip(types, layers, strict=True)],
    }).encode()
    descriptor: dict[str, object] = {"mediaType": OCI_MANIFEST, "digest": put(manifest),
                                     "size": len(manifest)}
    if platform_index:
        decoy = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                            "config": descriptor, "layers": []}).encode()
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": put(decoy), "size": len(decoy),
             "platform": {"os": "linux", "architecture": "arm64"}},
            {**descriptor, "platform": {"os": "linux", "architecture": "amd64"}},
        ]}).encode()
        descriptor = {"mediaType": OCI_INDEX, "digest": put(index), "size": len(index)}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index_path = root / "index.json"
    top: dict[str, Any] = (json.loads(index_path.read_text()) if index_path.exists()
                           else {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    for name in [ref, *extra_refs] if ref is not None else [None]:
        entry = dict(descriptor)
        if name is not None:
            entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        top["manifests"].append(entry)
    index_path.write_text(json.dumps(top))
    return root


def write_docker_archive(path: Path, layers: Sequence[bytes], *,
                         repo_tags: Sequence[str] = ("example:latest",)) -> Path:
    """Write a ``docker save``-style archive (``<id>/layer.tar`` + manifest.json)."""
    config = _config(layers)
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    members: list[tuple[str, bytes]] = [(config_name, config)]
    names = []
    for layer in layers:
        name = f"{hashlib.sha256(layer).hexdigest()}/layer.tar"
        names.append(name)
        members.append((name, layer))
    manifest = [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": names}]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = MTIME
            archive.addfile(info, io.BytesIO(data))
    return path


# -- root file system trees ---------------------------------------------------------------


def make_rootfs(root: Path, *, big_size: int = 3 * (1 << 20) + 12345) -> Path:
    """A small root file system with one of everything ``dir:`` sources must keep."""
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc" / "hostname").write_bytes(b"example\n")
    (root / "etc" / "empty").write_bytes(b"")
    ping = root / "usr" / "bin" / "ping"
    ping.write_bytes(b"\x7fELF ping")
    os.chmod(ping, 0o4755)
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    os.setxattr(root / "etc", "user.comment", b"\xff\x00binary")
    os.link(ping, root / "usr" / "bin" / "ping6")
    os.link(ping, root / "aping")
    os.symlink("usr/bin", root / "bin")
    os.mkfifo(root / "etc" / "initctl")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "null", 0o666)
    tmp = root / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    owned = root / "home" / "user"
    owned.mkdir(parents=True)
    (owned / "notes").write_bytes(b"mine\n")
    os.chown(owned, 1000, 1000)
    os.chown(owned / "notes", 1000, 100)
    big = root / "big.bin"
    with big.open("wb") as f:
        f.write(bytes(range(256)) * (big_size // 256) + b"x" * (big_size % 256))
    os.utime(big, ns=(MTIME * 10**9 + 123456789, MTIME * 10**9 + 123456789))
    return root


# -- snapshots ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    """What a user of a tree sees at one path (``content`` is a BLAKE3 hex)."""

    kind: Kind
    mode: int
    uid: int
    gid: int
    content: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    links: frozenset[str] = frozenset()
    """The other names of this regular file."""
    mtime: int | None = None


def snapshot_dir(root: Path, *, mtimes: bool = False,
                 skip_xattrs: Iterable[str] = ()) -> dict[str, FileState]:
    """The state of every path under ``root`` ("/" is ``root`` itself), by lstat."""
    skipped = set(skip_xattrs)
    found: dict[str, os.stat_result] = {"/": os.lstat(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            found["/" + os.fspath(full.relative_to(root))] = os.lstat(full)
    names: dict[tuple[int, int], set[str]] = {}
    for path, st in found.items():
        if stat.S_ISREG(st.st_mode):
            names.setdefault((st.st_dev, st.st_ino), set()).add(path)
    states = {}
    for path, st in found.items():
        full = root / path.lstrip("/")
        kind = _kind_of(st.st_mode)
        xattrs = {n: os.getxattr(full, n, follow_symlinks=False)
                  for n in os.listxattr(full, follow_symlinks=False) if n not in skipped}
        states[path] = FileState(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            content=blake3.blake3(full.read_bytes()).hexdigest() if kind is Kind.REGULAR
            else None,
            target=os.readlink(full) if kind is Kind.SYMLINK else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
            if kind in (Kind.CHARACTER, Kind.BLOCK) else None,
            xattrs=xattrs,
            links=frozenset(names.get((st.st_dev, st.st_ino), set()) - {path}),
            mtime=st.st_mtime_ns if mtimes else None,
        )
    return states


def manifest_content(entry: Entry, store: Path) -> bytes:
    """A regular file's bytes read back from the store, checking every blob's hash."""
    parts = []
    for chunk in entry.blobs:
        data = blob_path(store, chunk.digest).read_bytes()
        assert blake3.blake3(data).digest() == chunk.digest, f"blob {chunk.hex} is corrupt"
        assert len(data) == chunk.size
        parts.append(data)
    content = b"".join(parts)
    if entry.digest is not None:
        assert blake3.blake3(content).digest() == entry.digest
    return content


def snapshot_manifest(manifest: Manifest, store: Path, *, mtimes: bool = False,
                      implicit_root: FileState | None = None) -> dict[str, FileState]:
    """The state a mount of ``manifest`` would show, contents read back from ``store``.

    Parents missing from the manifest are implicit 0755 root directories.
    """
    entries = dict(manifest.entries)
    for path in list(entries):
        parent = path.rpartition("/")[0] or "/"
        while parent not in entries:
            entries[parent] = Entry(Kind.DIRECTORY, mode=0o755)
            parent = parent.rpartition("/")[0] or "/"
    groups: dict[str, set[str]] = {}
    for path, entry in entries.items():
        if entry.kind is Kind.HARDLINK:
            assert entry.target is not None
            groups.setdefault(entry.target, {entry.target}).add(path)
    states = {}
    for path, entry in entries.items():
        owner = entry.target if entry.kind is Kind.HARDLINK else path
        assert owner is not None
        real = entries[owner]
        content = None
        if real.kind is Kind.REGULAR:
            content = blake3.blake3(manifest_content(real, store)).hexdigest()
        states[path] = FileState(
            kind=real.kind,
            mode=real.mode if real.mode is not None else 0,
            uid=real.uid or 0,
            gid=real.gid or 0,
            content=content,
            target=real.target if real.kind is Kind.SYMLINK else None,
            rdev=real.rdev,
            xattrs=dict(real.xattrs or {}),
            links=frozenset(groups.get(owner, set()) - {path}),
            mtime=real.mtime if mtimes else None,
        )
    if implicit_root is not None and "/" not in manifest.entries:
        states["/"] = implicit_root
    return states


def _kind_of(mode: int) -> Kind:
    for test, kind in ((stat.S_ISREG, Kind.REGULAR), (stat.S_ISDIR, Kind.DIRECTORY),
                       (stat.S_ISLNK, Kind.SYMLINK), (stat.S_ISCHR, Kind.CHARACTER),
                       (stat.S_ISBLK, Kind.BLOCK), (stat.S_ISFIFO, Kind.FIFO)):
        if test(mode):
            return kind
    raise ValueError(f"unexpected file type {mode:o}")
