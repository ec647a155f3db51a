"""Playing profile packs: the blobs of a prefetch plan fetched as one pack set
(``store.pack``), one plain GET per part, each entry verified and cached on its own as it
arrives.

``PackPlayer.play(chunks)`` (run with ``nursery.start``) registers every blob of
``chunks`` that is not cached or in flight as a *carried* flight (``Fetcher.carry``) and
asks the stores, in mirror order, for part 0 of the set named by ``chunks``: whoever asks
for one of those blobs meanwhile joins its flight instead of starting a second download
(the start-up's first reads come before the pack's header does, and the pack brings
those files first). Once the header is in, blobs the set does not hold are released, the
other parts are requested from the same store, and ``play`` reports started. A store
without packs costs the reads that come before its 404 one round trip. Each entry's
bytes stream into a ``CacheFill`` (through a zstd decoder when so stored) and are
published only once its length and BLAKE3 hash match; the flight's waiters wake at once
(``Fetcher.delivered``), so the first files of the start-up are usable while the rest are
still arriving.

Failure never costs more than the packs did: an entry that does not verify is refused
(nothing of it is cached) and fetched on its own; a part that is missing, malformed,
truncated, too slow (the fetcher's minimum rate and per-socket timeouts) or over its time
(``deadline`` plus its size at the minimum rate) releases every entry it has not
delivered (``Fetcher.release``) and those are fetched on their own, while what it
delivered stays. An on-demand read does not wait on a stalled part
(``FetchConfig.pack_patience``). Packs are skipped when less than half of the plan's
bytes are missing from the cache. Nothing here raises: failures are logged and counted
(``statistics()``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass

import trio

from ocixfs.cache.blobs import Cache, CacheFill
from ocixfs.config import FetchConfig
from ocixfs.errors import CacheError, FormatError
from ocixfs.fetch.fetcher import Carrier, Fetcher, Sink, cache_sink
from ocixfs.image.format import Chunk
from ocixfs.store.layout import pack_name
from ocixfs.store.pack import (
    ENTRY,
    HEADER,
    Encoding,
    PackEntry,
    PackHeader,
    check_first_header,
    check_part_header,
    pack_set_id,
    parse_entries,
    parse_header,
)
from ocixfs.store.remote import AttemptFailed, Body, FailureKind, Source, attempt_errors, check_rate

__all__ = ["PackPlayer", "PackStatistics"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PackStatistics:
    """Counters: parts asked for, found and received whole; blobs delivered, refused (bad
    bytes) and released to single fetches; bytes received in packs."""

    parts_requested: int = 0
    parts_found: int = 0
    parts_complete: int = 0
    blobs_delivered: int = 0
    blobs_refused: int = 0
    blobs_released: int = 0
    bytes_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Stream:
    """A part's body read in exact amounts; every piece counts as its carrier's progress
    and towards the minimum rate."""

    def __init__(self, body: Body, carrier: Carrier, config: FetchConfig,
                 stats: PackStatistics) -> None:
        self._pieces = aiter(body)
        self._buffer = b""
        self._carrier = carrier
        self._config = config
        self._stats = stats
        self._received = 0
        self._started = trio.current_time()

    async def take(self, limit: int) -> bytes:
        """At most ``limit`` (> 0) bytes. Raises ``AttemptFailed``: ``TRUNCATED`` at the
        end, or whatever reading the body failed with."""
        if not self._buffer:
            try:
                with attempt_errors():
                    self._buffer = await anext(self._pieces)
            except StopAsyncIteration:
                raise AttemptFailed(FailureKind.TRUNCATED, "pack ends early") from None
            self._received += len(self._buffer)
            self._stats.bytes_received += len(self._buffer)
            self._carrier.progress = trio.current_time()
            check_rate(self._config, self._received, self._started)
        piece, self._buffer = self._buffer[:limit], self._buffer[limit:]
        return piece

    async def exactly(self, size: int) -> bytes:
        parts = []
        while size:
            parts.append(await self.take(size))
            size -= len(parts[-1])
        return b"".join(parts)


_Claim = Callable[["PackHeader"], Awaitable[Sequence["PackEntry"]]]
_MAX_ENTRIES = 1 << 20
_COMMITS_AHEAD = 8


@dataclass(frozen=True, slots=True)
class _Received:
    """An entry whose bytes are all in: the fill, its sink and the bytes not yet written."""

    chunk: Chunk
    writer: CacheFill
    sink: Sink
    tail: list[bytes]


class PackPlayer:
    """Plays pack sets into ``cache`` through ``fetcher``'s flights, from ``sources`` (the
    fetcher's, in mirror order); ``limiter`` bounds the worker threads."""

    def __init__(self, fetcher: Fetcher, sources: Sequence[Source], cache: Cache,
                 config: FetchConfig, limiter: trio.CapacityLimiter) -> None:
        self._fetcher = fetcher
        self._sources = list(sources)
        self._cache = cache
        self._config = config
        self._limiter = limiter
        self._stats = PackStatistics()

    def statistics(self) -> PackStatistics:
        return PackStatistics(**self._stats.as_dict())

    async def play(self, chunks: Sequence[Chunk],
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch the pack set of ``chunks`` (a plan: each blob once, in order). Reports
        started once every blob of ``chunks`` that is not cached or in flight is
        registered as in flight (before the first byte is asked for; blobs the set turns
        out not to hold are then fetched on their own); returns when every part ended.
        Never raises but ``Cancelled``."""
        if not self._worth_it(chunks):
            task_status.started()
            return
        planned = {chunk.digest: chunk for chunk in chunks}
        set_id = pack_set_id(chunks)
        carrier = self._carry(planned)
        task_status.started()
        async with trio.open_nursery() as nursery:
            for source in self._sources:
                first = await nursery.start(self._first_part, source, set_id, planned, carrier)
                if first is not None:
                    header, carriers = first
                    for part in range(1, header.parts):
                        nursery.start_soon(self._other_part, source, header, part,
                                           carriers[part], planned)
                    break
                carrier = self._carry(planned)  # the next mirror: whatever is still missing

    def _carry(self, planned: dict[bytes, Chunk]) -> Carrier:
        """A new carrier holding every planned blob not cached or in flight."""
        carrier = Carrier()
        for chunk in planned.values():  # until a header says which parts bring what
            self._fetcher.carry(chunk, carrier)
        return carrier

    def _worth_it(self, chunks: Sequence[Chunk]) -> bool:
        missing = sum(chunk.size for chunk in chunks if not self._cache.contains(chunk))
        return missing > 0 and missing * 2 >= sum(chunk.size for chunk in chunks)

    async def _first_part(
        self, source: Source, set_id: bytes, planned: dict[bytes, Chunk],
        own_carrier: Carrier,
        *, task_status: trio.TaskStatus[tuple[PackHeader, list[Carrier]] | None],
    ) -> None:
        """Part 0 from ``source``: once its header is in and checked, every blob of the set
        that ``own_carrier`` holds is handed to the carrier of its part and ``(header,
        carriers)`` reported; None is reported when it is not there or unusable. Then
        part 0 delivers its own entries."""
        name = pack_name(set_id, 0)
        reported = False

        async def claim(header: PackHeader) -> Sequence[PackEntry]:
            nonlocal reported
            check_first_header(header, set_id, planned, f"{source.label}: {name}")
            carriers = [own_carrier, *(Carrier() for _ in range(1, header.parts))]
            listed = set()
            for entry in header.entries:
                listed.add(entry.digest)
                self._fetcher.hand_over(planned[entry.digest], own_carrier,
                                        carriers[entry.part])
            for digest, chunk in planned.items():
                if digest not in listed:
                    self._release(chunk, own_carrier)
            task_status.started((header, carriers))
            reported = True
            return _own(header, 0)

        await self._part(source, name, planned, own_carrier, claim)
        if not reported:
            task_status.started(None)

    async def _other_part(self, source: Source, first: PackHeader, part: int,
                          carrier: Carrier, planned: dict[bytes, Chunk]) -> None:
        """Part ``part`` > 0, whose blobs ``carrier`` has carried since part 0's header."""
        name = pack_name(first.set_id, part)
        own = _own(first, part)

        async def claim(header: PackHeader) -> Sequence[PackEntry]:
            check_part_header(header, first, part, f"{source.label}: {name}")
            await trio.lowlevel.checkpoint()
            return own

        await self._part(source, name, planned, carrier, claim)

    async def _part(self, source: Source, name: str, planned: dict[bytes, Chunk],
                    carrier: Carrier, claim: _Claim) -> None:
        """Fetch one part: read its header, ``claim`` it (check it, get the entries whose
        bodies follow), deliver those; however it ends, release every blob ``carrier``
        still holds."""
        self._stats.parts_requested += 1
        try:
            with trio.move_on_after(self._config.deadline) as scope, attempt_errors():
                async with source.body(name, no_cache=False) as body:
                    self._stats.parts_found += 1
                    stream = _Stream(body, carrier, self._config, self._stats)
                    header = await _read_header(stream, f"{source.label}: {name}")
                    entries = deque(await claim(header))
                    scope.deadline += sum(e.stored for e in entries) / self._config.min_rate
                    await self._deliver(stream, entries, planned, carrier, source)
                    self._stats.parts_complete += 1
            if scope.cancelled_caught:
                log.warning("%s: %s: not received in time", source.label, name)
        except AttemptFailed as failure:
            level = logging.DEBUG if failure.kind is FailureKind.NOT_FOUND else logging.WARNING
            log.log(level, "%s: %s: %s", source.label, name, failure.message)
        except FormatError as exc:
            log.warning("%s; not using it", exc)
        finally:
            for chunk in planned.values():
                self._release(chunk, carrier)

    async def _deliver(self, stream: _Stream, entries: deque[PackEntry],
                       planned: dict[bytes, Chunk], carrier: Carrier, source: Source) -> None:
        """Each entry in turn (taken off ``entries`` once its bytes are in): received if
        this carrier still holds its blob, else skipped. Received entries are verified and
        published by tasks of their own (at most ``_COMMITS_AHEAD`` at once), so the
        stream keeps flowing while the cache hashes and syncs."""
        slots = trio.Semaphore(_COMMITS_AHEAD)
        failure: AttemptFailed | None = None
        async with trio.open_nursery() as committing:
            try:
                while entries:
                    await self._next_entry(stream, entries, planned, carrier, slots,
                                           lambda received: committing.start_soon(
                                               self._commit, received, carrier, source, slots))
            except AttemptFailed as exc:  # raised here, not as a group from the nursery
                failure = exc
        if failure is not None:
            raise failure

    async def _next_entry(self, stream: _Stream, entries: deque[PackEntry],
                          planned: dict[bytes, Chunk], carrier: Carrier,
                          slots: trio.Semaphore, commit: Callable[[_Received], None]) -> None:
        """Receive (or skip) the first of ``entries`` and take it off; ``commit`` it when
        its bytes are in, holding one of ``slots`` until the commit ends."""
        entry = entries[0]
        chunk = planned[entry.digest]
        if not self._fetcher.carries(chunk, carrier):
            await stream.exactly(entry.stored)
            entries.popleft()
            return
        await slots.acquire()
        try:
            received = await self._receive(stream, entry, chunk)
        except BaseException:
            slots.release()
            raise
        entries.popleft()
        if isinstance(received, str):
            slots.release()
            self._refuse(chunk, carrier, received)
        else:
            commit(received)

    async def _receive(self, stream: _Stream, entry: PackEntry, chunk: Chunk) -> _Received | str:
        """One entry's bytes into a cache fill (big ones written as they come, in worker
        threads); the fill to commit, or why its bytes were refused (the stream is then
        still left at the next entry). Raises ``AttemptFailed`` when the stream fails."""
        try:
            writer = self._cache.fill(chunk)
        except CacheError as exc:
            await stream.exactly(entry.stored)
            return str(exc)
        try:
            sink = cache_sink(writer, zstd=entry.encoding is Encoding.ZSTD,
                              max_window=self._config.zstd_max_window)
            left, batch, batched, refused = entry.stored, [], 0, None
            while left:
                piece = await stream.take(left)
                left, batched = left - len(piece), batched + len(piece)
                batch.append(piece)
                if left and batched >= self._config.write_batch and refused is None:
                    refused = await _refusal(
                        trio.to_thread.run_sync(sink.write, batch, limiter=self._limiter))
                    batch, batched = [], 0
        except BaseException:
            writer.abort()
            raise
        if refused is not None:
            writer.abort()
            return refused
        return _Received(chunk, writer, sink, batch)

    async def _commit(self, received: _Received, carrier: Carrier, source: Source,
                      slots: trio.Semaphore) -> None:
        """Write an entry's last bytes, verify and publish it; then wake its waiters, or
        refuse it (it is fetched on its own)."""
        chunk, sink = received.chunk, received.sink

        def last_bytes() -> None:
            sink.write(received.tail)
            if sink.decoded != chunk.size:
                raise AttemptFailed(FailureKind.CORRUPT, f"{sink.decoded} of {chunk.size} bytes")

        refused: str | None = None
        try:
            refused = await _refusal(self._cache.commit(received.writer, first=last_bytes))
        except BaseException:
            self._release(chunk, carrier)  # cancelled: whoever waits fetches it on its own
            raise
        finally:
            received.writer.abort()
            slots.release()
        if refused is None:
            self._stats.blobs_delivered += 1
            self._fetcher.delivered(chunk, carrier, source.label)
        else:
            self._refuse(chunk, carrier, refused)

    def _refuse(self, chunk: Chunk, carrier: Carrier, why: str) -> None:
        self._stats.blobs_refused += 1
        log.warning("pack entry %s refused (%s); fetching it on its own", chunk.hex, why)
        self._release(chunk, carrier)

    def _release(self, chunk: Chunk, carrier: Carrier) -> None:
        if self._fetcher.carries(chunk, carrier):
            self._stats.blobs_released += 1
            self._fetcher.release(chunk, carrier)


def _own(header: PackHeader, part: int) -> list[PackEntry]:
    return [entry for entry in header.entries if entry.part == part]


async def _refusal(step: Awaitable[object]) -> str | None:
    """Await one step of storing an entry; why its bytes were refused, or None."""
    try:
        with attempt_errors():
            await step
    except AttemptFailed as failure:
        return failure.message
    except CacheError as exc:
        return str(exc)
    return None


async def _read_header(stream: _Stream, where: str) -> PackHeader:
    """A part's header and entry table; ``FormatError`` when malformed or cut short."""
    try:
        set_id, part, parts, count = parse_header(await stream.exactly(HEADER.size), where)
        if count > _MAX_ENTRIES:
            raise FormatError(f"{where}: {count} entries")
        table = await stream.exactly(count * ENTRY.size)
    except AttemptFailed as failure:
        if failure.kind is FailureKind.TRUNCATED:
            raise FormatError(f"{where}: ends inside its header") from None
        raise
    return PackHeader(set_id, part, parts, parse_entries(table, count, where))
