"""The hand-written OCIX test vectors in ``tests/vectors/*.hex`` and the models they encode.

The ``.hex`` files were written by hand from the format description (comments say what
each item is); nothing here is produced by ``ocixfs.image.format``. Times are spelled out with
``datetime`` so the expected instants do not depend on the code under test.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from ocixfs.image.format import Chunk, Entry, Kind, Manifest

__all__ = ["V0_REFERENCE", "V0_VARIANTS", "V1_XATTRS_CHUNKS", "VECTORS", "load_vector"]

VECTORS = Path(__file__).parent / "vectors"


def load_vector(name: str) -> bytes:
    """The bytes of ``tests/vectors/<name>.hex`` (``#`` starts a comment)."""
    text = (VECTORS / f"{name}.hex").read_text()
    return bytes.fromhex("".join(re.sub(r"#.*", "", line) for line in text.splitlines()))


def ns(*args: int, nanosecond: int = 0, offset_minutes: int = 0) -> int:
    """Nanoseconds since the epoch of a wall-clock time at a UTC offset."""
    zone = datetime.timezone(datetime.timedelta(minutes=offset_minutes))
    moment = datetime.datetime(*args, tzinfo=zone)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    delta = moment - epoch
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000 + nanosecond


HELLO = bytes.fromhex("ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f")
DIGITS = bytes.fromhex("53b63a6fc8605d0c0ce559317a00177d72adb24d669235e4c914f443a8831ca1")
DIGITS_HEAD = bytes.fromhex("efa769320e8163a49531f22c513970e7fb97d1acef3ab49d5c4bbd1bf2853bf8")
DIGITS_TAIL = bytes.fromhex("a0f54fa2f6963b6f8b81d47b3ef86d3e919657e42f1ae4e8416d86a93e4b9b3e")

V0_REFERENCE = Manifest(
    0,
    {
        "/": Entry(Kind.DIRECTORY, mode=0, uid=0, gid=0),
        "/bin": Entry(Kind.SYMLINK, mode=0o777, mtime=ns(2023, 11, 14, 22, 13, 20),
                      target="usr/bin"),
        "/dev": Entry(Kind.DIRECTORY, mode=0o755,
                      mtime=ns(2024, 2, 29, 12, 34, 56, nanosecond=123456789)),
        "/fifo": Entry(Kind.FIFO, mode=0o644),
        "/empty": Entry(Kind.REGULAR, mode=0o644, size=0),
        "/etc/x": Entry(Kind.REGULAR, mode=0o4755, uid=1000, username="user",
                        mtime=ns(2001, 9, 9, 1, 46, 40, nanosecond=500_000_000),
                        size=5, digest=HELLO),
        "/etc/xx": Entry(Kind.HARDLINK, target="/etc/x"),
        "/dev/sda": Entry(Kind.BLOCK, mode=0o660, gid=6, groupname="disk", rdev=(8, 0)),
        "/dev/null": Entry(Kind.CHARACTER, mode=0o666, rdev=(1, 3)),
    },
)

V1_XATTRS_CHUNKS = Manifest(
    1,
    {
        "/big": Entry(
            Kind.REGULAR,
            mode=0o644,
            size=10,
            digest=DIGITS,
            chunks=(Chunk(6, DIGITS_HEAD), Chunk(4, DIGITS_TAIL)),
            xattrs={
                "user.a": b"\x01\x02\x03",
                "security.capability": bytes.fromhex("0100000200200000") + bytes(12),
            },
        ),
        "/dir": Entry(
            Kind.DIRECTORY,
            mode=0o1777,
            uid=5,
            gid=7,
            atime=2**31 * 10**9,
            btime=-1,
            ctime=ns(9999, 12, 31, 23, 59, 59, nanosecond=999_999_999),
            xattrs={"user.x": b""},
        ),
    },
)

V0_VARIANTS = Manifest(
    0,
    {
        "/a": Entry(
            Kind.FIFO,
            mode=0o644,
            atime=ns(2020, 1, 1),
            ctime=ns(2020, 1, 1, nanosecond=500_000_000),
            mtime=ns(2020, 1, 1, 2, 0, 0, offset_minutes=120),
        ),
        "/b": Entry(Kind.SYMLINK, mode=0o777, target="/a",
                    mtime=ns(2019, 12, 31, 17, 0, 0, nanosecond=100_000_000, offset_minutes=-420)),
    },
)
