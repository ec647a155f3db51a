"""Helpers shared by the reliability tests (network, hostile input, daemon faults, stress).

- ``write_image(directory, files)`` writes an OCIX v1 manifest and its blob store directly
  (``format.encode`` + ``faultserver.make_store``): no build step, exact control over
  chunking, so a test knows which blob each byte lives in.
- ``black_hole()`` is a TCP address whose connections never complete (a listener with a
  full backlog): the way a dead route or a firewall that drops packets looks to a client.
- ``mount_args(...)`` the usual ``ocixfs mount`` options for a test mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

from ocixfs.image.format import Chunk, Entry, Kind, Manifest, encode
from tests.faultserver import make_store

__all__ = ["Image", "black_hole", "mount_args", "read_or_errno", "write_image"]


@dataclass(frozen=True)
class Image:
    ocix: Path
    store: Path
    contents: dict[str, bytes]
    blobs: dict[str, tuple[Chunk, ...]]

    def hexes(self, path: str) -> list[str]:
        return [chunk.hex for chunk in self.blobs[path]]


def write_image(
    directory: Path, files: Mapping[str, bytes], *, chunk_size: int | None = None
) -> Image:
    """``files`` maps absolute paths to contents; files longer than ``chunk_size`` are
    stored as a chunk list. Directories are implicit."""
    directory.mkdir(parents=True, exist_ok=True)
    store = directory / "store"
    entries = {"/": Entry(Kind.DIRECTORY, mode=0o755)}
    blobs: dict[str, tuple[Chunk, ...]] = {}
    for path, content in files.items():
        pieces = [content]
        if chunk_size is not None and len(content) > chunk_size:
            pieces = [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)]
        chunks = tuple(make_store(store, pieces)) if content else ()
        blobs[path] = chunks
        entries[path] = Entry(
            Kind.REGULAR,
            mode=0o644,
            size=len(content),
            digest=blake3.blake3(content).digest() if content else None,
            chunks=chunks if len(chunks) > 1 else None,
        )
    (store / "blobs" / "blake3").mkdir(parents=True, exist_ok=True)
    ocix = directory / "image.ocix"
    ocix.write_bytes(encode(Manifest(1, entries)))
    return Image(ocix, store, dict(files), blobs)


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` where a TCP connect hangs until the client gives up."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())  # fills the backlog; later SYNs are dropped
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def mount_args(store: str | list[str], cache: Path, *more: str) -> list[str]:
    stores = [store] if isinstance(store, str) else store
    args = [arg for url in stores for arg in ("--store", url)]
    return [*args, "--cache-dir", os.fspath(cache), "--prefetch", "none", *more]


def read_or_errno(path: Path) -> bytes | int:
    """The file's bytes, or the errno reading it failed with."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or errno.EIO
