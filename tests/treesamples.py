"""A hand-made manifest with every kind of entry, shared by the tree and fs_ops tests.

``sample()`` returns the manifest (entries in canonical order, as ``decode`` gives them),
the blob contents by digest (what a store would serve) and each regular file's content by
path.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

from ocixfs.image.format import Chunk, Entry, Kind, Manifest

T0 = 1_700_000_000_123_456_789
T1 = 1_600_000_000_000_000_001
CAPABILITY = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
BIG = bytes(range(15))  # three chunks: 5 + 7 + 3 bytes
BIG_CHUNKS = (BIG[:5], BIG[5:12], BIG[12:])


@dataclass(frozen=True)
class Sample:
    manifest: Manifest
    blobs: dict[bytes, bytes]
    contents: dict[str, bytes]


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def canonical(entries: dict[str, Entry]) -> dict[str, Entry]:
    """Order paths as canonical CBOR orders map keys: by encoded length, then bytewise."""
    return dict(sorted(entries.items(), key=lambda item: (len(item[0].encode()), item[0].encode())))


def regular(content: bytes, **fields: object) -> Entry:
    return Entry(
        Kind.REGULAR,
        size=len(content),
        digest=digest(content) if content else None,
        **fields,  # type: ignore[arg-type]
    )


def sample() -> Sample:
    contents = {
        "/etc/hostname": b"ocix\n",
        "/etc/empty": b"",
        "/etc/motd": b"welcome\n",
        "/usr/bin/su": b"\x7fELF su",
        "/usr/bin/big": BIG,
        "/usr/bin/tail3": BIG_CHUNKS[2],
        "/home/user/café": b"caf\xc3\xa9\n",
    }
    entries: dict[str, Entry] = {
        "/": Entry(Kind.DIRECTORY, mode=0o755, mtime=T0, atime=T1),
        "/bin": Entry(Kind.SYMLINK, mode=0o777, mtime=T0, target="usr/bin"),
        "/dev": Entry(Kind.DIRECTORY, mode=0o755, mtime=T0),
        "/dev/null": Entry(Kind.CHARACTER, mode=0o666, mtime=T0, rdev=(1, 3)),
        "/dev/sda": Entry(Kind.BLOCK, mode=0o660, gid=6, mtime=T0, rdev=(8, 0)),
        "/dev/initctl": Entry(Kind.FIFO, mode=0o600, mtime=T0),
        "/etc": Entry(Kind.DIRECTORY, mode=0o755, mtime=T0, ctime=T1),
        "/etc/hostname": regular(contents["/etc/hostname"], mode=0o644, mtime=T0),
        "/etc/empty": regular(b"", mode=0o600, mtime=T0),
        "/etc/motd": regular(contents["/etc/motd"], mode=0o644, uid=3, gid=4, mtime=T0),
        "/usr/share/motd": Entry(Kind.HARDLINK, target="/etc/motd"),
        "/usr/lib/motd.link": Entry(Kind.HARDLINK, target="/etc/motd"),
        "/usr/bin/su": regular(
            contents["/usr/bin/su"],
            mode=0o4755,
            mtime=T0,
            xattrs={"security.capability": CAPABILITY, "user.note": b"setuid"},
        ),
        "/usr/bin/big": Entry(
            Kind.REGULAR,
            mode=0o755,
            mtime=T0,
            size=len(BIG),
            digest=digest(BIG),
            chunks=tuple(Chunk(len(part), digest(part)) for part in BIG_CHUNKS),
        ),
        "/usr/bin/tail3": regular(contents["/usr/bin/tail3"], mode=0o644, mtime=T0),
        "/var/tmp": Entry(Kind.DIRECTORY, mode=0o1777, mtime=T0),
        "/home/user": Entry(Kind.DIRECTORY, mode=0o700, uid=1000, gid=1000, mtime=T0),
        "/home/user/café": regular(
            contents["/home/user/café"], mode=0o640, uid=1000, gid=1000, mtime=T0
        ),
        "/home/user/link": Entry(Kind.SYMLINK, mode=0o777, mtime=T0, target="café"),
    }
    blobs = {digest(part): part for part in BIG_CHUNKS}
    blobs.update((digest(data), data) for data in contents.values() if data)
    return Sample(Manifest(version=1, entries=canonical(entries)), blobs, contents)
