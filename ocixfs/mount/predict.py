"""Prefetching without a profile: the ELF closure of what a start-up executes.

A mount that plays no profile (``--prefetch auto`` or ``all`` found none to play or to
borrow) follows every executable it serves: on the first open of a regular file with an
execute bit, ``ElfPredictor`` fetches all of its blobs at once (the kernel and ``ld.so``
map the whole file; read on demand its chunks would come one or two at a time; a file over
``MAX_WHOLE_FILE`` only as its headers are read), reads its ELF headers, and does the same
for its ``PT_INTERP`` and its ``DT_NEEDED`` libraries, transitively, found in its
``DT_RUNPATH``/``DT_RPATH`` and the usual library directories (no ``ld.so.cache``).
``ld.so`` opens the libraries one after another, a round trip each; this fetches them
together while the program's own chunks arrive. Nothing is guessed: every file named is
one the loader will map (the README's "Prefetching and profiles" has the measurement, and
the predictors that were measured and not adopted).

The file's bytes are untrusted: every read is bounded (``MAX_HEADER_READ``), offsets are
checked against the file, and anything malformed ends that file's following quietly. At
most ``MAX_FOLLOWED`` files are followed per mount. Fetches and the header reads run at
background priority through the reader (``Reader.ensure``, ``Reader.read_for_prefetch``:
no read-ahead, not counted as a program's reads), so a read that waits is always served
first; failures are counted, never raised.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from ocixfs.errors import OcixError
from ocixfs.fetch.fetcher import Priority
from ocixfs.image.format import Chunk, Kind
from ocixfs.image.tree import Node, Tree

__all__ = ["ElfPredictor", "PredictorStats", "resolve"]

log = logging.getLogger(__name__)

LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                "/lib", "/usr/lib", "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu")
MAX_FOLLOWED = 256  # files followed per mount
MAX_WHOLE_FILE = 64 << 20  # larger files: only the chunks their headers are read from
MAX_HEADER_READ = 1 << 20  # bytes read at once from a followed file (headers, .dynamic, strings)
MAX_SYMLINKS = 40
EXECUTE_BITS = 0o111
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29


class ReadingFetcher(Protocol):
    async def read_for_prefetch(self, blobs: Sequence[Chunk], offset: int,
                                size: int) -> bytes: ...

    async def ensure(self, chunk: Chunk, *, priority: Priority = Priority.PREFETCH) -> None: ...


@dataclass(frozen=True, slots=True)
class PredictorStats:
    followed: int  # executables and libraries whose headers were read
    predicted: int  # libraries and interpreters named by them and found in the tree
    blobs: int  # blobs asked for
    failed_blobs: int

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class ElfPredictor:
    """Follow executables as they are opened (``note_access``, on the trio thread) and
    prefetch their ELF closure; ``run`` does the work until cancelled."""

    def __init__(self, tree: Tree, reader: ReadingFetcher) -> None:
        self._tree = tree
        self._reader = reader
        self._seen: set[int] = set()
        self._send, self._receive = trio.open_memory_channel[Node](math.inf)
        self._followed = self._predicted = self._blobs = self._failed = 0

    def note_access(self, node_path: str, ino: int) -> None:
        """The first open of an inode: follow it if it is an executable regular file."""
        node = self._tree.get(ino)
        if node is not None and node.kind is Kind.REGULAR and node.mode & EXECUTE_BITS:
            self._queue(node)

    def _queue(self, node: Node) -> None:
        if node.ino in self._seen or len(self._seen) >= MAX_FOLLOWED or not node.blobs:
            return
        self._seen.add(node.ino)
        self._send.send_nowait(node)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            async for node in self._receive:
                nursery.start_soon(self._follow, node, nursery)

    async def _follow(self, node: Node, nursery: trio.Nursery) -> None:
        if node.size <= MAX_WHOLE_FILE:
            for chunk in node.blobs:
                nursery.start_soon(self._fetch, chunk)
        self._followed += 1
        try:
            named = await self._loaded_by(node)
        except (OcixError, ValueError, struct.error, IndexError) as exc:
            log.debug("not following %s: %s", node.path, exc)
            return
        for found in named:
            self._predicted += 1
            self._queue(found)

    async def _fetch(self, chunk: Chunk) -> None:
        self._blobs += 1
        try:
            await self._reader.ensure(chunk, priority=Priority.PREFETCH)
        except OcixError as exc:
            self._failed += 1
            log.debug("predicted blob %s: %s", chunk.hex, exc)

    async def _read(self, node: Node, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > node.size or size > MAX_HEADER_READ:
            raise ValueError(f"ELF range {offset}+{size} outside the file")
        data = await self._reader.read_for_prefetch(node.blobs, offset, size)
        if len(data) != size:
            raise ValueError("short read")
        return data

    async def _loaded_by(self, node: Node) -> list[Node]:
        """The regular files the loader maps for ``node``: PT_INTERP and DT_NEEDED."""
        if node.size < 64:
            return []
        head = await self._read(node, 0, 64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # ELF64 little-endian
            return []
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        if phentsize < 56 or phnum > 128:
            return []
        table = await self._read(node, phoff, phentsize * phnum)
        loads: list[tuple[int, int, int]] = []
        interp = dynamic = None
        for index in range(phnum):
            kind, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from(
                "<IIQQQQ", table, index * phentsize)
            if kind == PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif kind == PT_INTERP:
                interp = (offset, filesz)
            elif kind == PT_DYNAMIC:
                dynamic = (offset, filesz)
        found: list[Node] = []
        if interp is not None:
            path = (await self._read(node, *interp)).split(b"\0", 1)[0].decode()
            found += [n for n in (resolve(self._tree, path),) if n is not None]
        if dynamic is not None:
            found += await self._needed(node, dynamic, loads)
        return found

    async def _needed(self, node: Node, dynamic: tuple[int, int],
                      loads: list[tuple[int, int, int]]) -> list[Node]:
        data = await self._read(node, dynamic[0], dynamic[1] - dynamic[1] % 16)
        tags: list[tuple[int, int]] = []
        for at in range(0, len(data), 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == DT_NULL:
                break
            tags.append((tag, value))
        values = dict(tags)
        strtab, strsz = values.get(DT_STRTAB), values.get(DT_STRSZ)
        if strtab is None or strsz is None:
            return []
        base = next((offset + strtab - vaddr for vaddr, offset, size in loads
                     if vaddr <= strtab < vaddr + size), None)
        if base is None:
            return []
        strings = await self._read(node, base, min(strsz, node.size - base))

        def text(at: int) -> str:
            return strings[at:strings.index(b"\0", at)].decode()

        search = [d for t, v in tags if t in (DT_RUNPATH, DT_RPATH)
                  for d in text(v).split(":") if d.startswith("/")]
        found = []
        for tag, value in tags:
            if tag != DT_NEEDED:
                continue
            name = text(value)
            if "/" in name:
                continue
            library = next((n for d in (*search, *LIBRARY_DIRS)
                            if (n := resolve(self._tree, f"{d}/{name}")) is not None), None)
            if library is not None:
                found.append(library)
        return found

    def statistics(self) -> PredictorStats:
        return PredictorStats(followed=self._followed, predicted=self._predicted,
                              blobs=self._blobs, failed_blobs=self._failed)


def resolve(tree: Tree, path: str) -> Node | None:
    """The regular file ``path`` names in ``tree``, following symlinks as the kernel
    would inside the image (absolute targets from the image's root); None if none."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    node = tree.root
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            node = node.parent
            continue
        child = node.child(os.fsencode(name))
        if child is None:
            return None
        if child.kind is Kind.SYMLINK:
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            target = child.link_target.decode(errors="surrogateescape")
            if target.startswith("/"):
                node = tree.root
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        node = child
    return node if node.kind is Kind.REGULAR else None
