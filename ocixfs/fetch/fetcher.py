"""Fetch blobs from the stores into the cache: mirrors, deadlines, priorities, one flight
per blob.

Stores are mirrors tried in order, each read through a ``Source`` (``store.remote``);
when a store advertises zstd the fetcher asks for a blob's ``.zst`` sibling first and falls
back to the plain name on 404. The slots come from ``scheduler``.

Contract:

- ``Fetcher.ensure(chunk, priority=..., deadline=...)`` returns once the blob is in the
  cache, verified, or raises ``FetchError`` (``BlobNotFound``, ``BlobCorrupt``,
  ``FetchTimeout``) or ``CacheError``. It never hangs: a waiter gives up at its
  ``deadline`` (trio time), and each fetch is bounded by ``deadline + size / min_rate``
  seconds, by the per-socket timeouts and by the minimum transfer rate.
- One flight per digest: concurrent requests for a blob share one transfer, run as a task
  in the fetcher's nursery (a waiter that gives up does not cancel it, so the bytes still
  land in the cache for the next read).
- One transfer per digest on the host: a flight first claims the blob in the cache
  (``Cache.claim_fetch``) once it has a slot; while another process holds the claim it
  waits until the blob is there (``fetched_by_others``) or the claim is free, and after
  its whole budget it fetches anyway.
- Priorities: ``ON_DEMAND`` fetches have their own slots; lower priorities share a smaller
  pool, start only when no on-demand fetch is queued, best priority first, and a queued
  flight is promoted when an on-demand read joins it. Host-wide, background fetches also
  wait while another process fetches for a waiting read (``scheduler``, ``cache.demand``).
- A source that fails (connection, timeout, 5xx, bad bytes) is tried after the healthy
  ones for ``source_penalty`` seconds. A blob whose fetch failed fails fast for
  ``failure_memory`` seconds (the kernel retries a failed READ at once).
- A 429 or 503 with ``Retry-After`` (seconds or a date, at most an hour) keeps that source
  from being asked again before then; the next mirror is tried, and when none is left the
  fetch waits for the earliest one if that fits its time, else fails at once.
- A blob larger than the cache's whole quota fails at once with ``CacheFullError``,
  before any request.
- Bytes stream into a ``CacheFill`` in batches (hash + write, and zstd decompression,
  in worker threads). A body longer than the blob, or a zstd stream that decompresses to
  more, is cut and counted as corrupt; nothing unverified reaches the cache.
- What sources raise is translated by ``store.remote.attempt_errors`` into
  ``AttemptFailed``; what leaves this module is ``FetchError`` or ``CacheError``.
- A flight may be *carried* by something other than its own task (a profile pack,
  ``fetch.packs``): ``carry`` registers it, waiters join it as usual, and the carrier ends
  it with ``delivered`` or ``release`` (then the blob is fetched on its own, at the
  priority its waiters asked for, and they keep waiting on the same flight). An on-demand
  waiter does not wait on a carrier that stalls: after ``pack_patience`` seconds without
  bytes, or a quarter of the deadline, it releases the blob and it is fetched on its own.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import IO, Any, Protocol, cast

import trio
import zstandard

from ocixfs.cache.blobs import Cache, CacheFill, FetchClaim
from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import (
    BlobCorrupt,
    BlobNotFound,
    FetchError,
    FetchTimeout,
    OcixError,
    UsageError,
)
from ocixfs.fetch.scheduler import Priority, Scheduler, Ticket
from ocixfs.image.format import Chunk
from ocixfs.store.layout import blob_name
from ocixfs.store.remote import (
    AttemptFailed,
    Body,
    FailureKind,
    Source,
    attempt_errors,
    check_rate,
)

__all__ = ["Carrier", "FetchStatistics", "Fetcher", "Priority", "Sink", "cache_sink"]

log = logging.getLogger(__name__)

_ASKED_TO_WAIT = "asked to retry later (Retry-After)"
_CLAIM_POLL_FIRST = 0.005  # seconds between looks while another process fetches a blob …
_CLAIM_POLL_MAX = 0.05  # … doubling up to this
_HOST_POLL = 0.02  # seconds between looks while other processes fetch for waiting reads


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchStatistics:
    """A snapshot. ``errors`` counts failed attempts by kind (one blob may fail at several
    sources); ``failed_blobs`` counts blobs no source delivered; ``fast_failures`` requests
    answered from the recent-failure memory; ``wait_timeouts`` waiters that gave up;
    ``fetched_by_others`` blobs this process waited for while another process on the host
    fetched them (one transfer per blob host-wide). Byte and blob counts are of verified
    content; ``bytes_received_by_source`` counts what came over the wire (compressed,
    failed attempts included)."""

    blobs_fetched: int
    bytes_fetched: int
    blobs_by_source: dict[str, int]
    bytes_received_by_source: dict[str, int]
    errors: dict[str, int]
    failed_blobs: int
    fast_failures: int
    wait_timeouts: int
    fetched_by_others: int
    in_flight: int
    queued: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, in field order (copies of the mappings)."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            out[item.name] = dict(value) if isinstance(value, dict) else value
        return out


class Carrier:
    """Something other than a flight's own task bringing blobs into the cache (one part of
    a profile pack); ``progress`` is when it last received bytes (trio time)."""

    __slots__ = ("progress",)

    def __init__(self) -> None:
        self.progress = trio.current_time()


@dataclass(slots=True)
class _Flight:
    """One blob's fetch. ``progress``: when it last received body bytes (or started);
    ``abandoned_at``: when a waiter last gave up on it. A carried flight has a ``carrier``
    and no ticket; ``wanted`` is the priority its waiters asked for."""

    chunk: Chunk
    ticket: Ticket | None
    done: trio.Event = field(default_factory=trio.Event)
    error: OcixError | None = None
    progress: float = field(default_factory=trio.current_time)
    abandoned_at: float = -math.inf
    carrier: Carrier | None = None
    wanted: Priority = Priority.BACKGROUND


class _Sink(Protocol):
    @property
    def decoded(self) -> int: ...

    def write(self, pieces: list[bytes]) -> None: ...


class _PlainSink:
    def __init__(self, writer: CacheFill) -> None:
        self._writer = writer

    @property
    def decoded(self) -> int:
        return self._writer.written

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._writer.write(piece)


class _ZstdSink:
    """Decompresses into the writer; output is produced ``write_size`` at a time and the
    writer refuses more than the blob's size, so a zstd bomb stops at the expected size."""

    def __init__(self, writer: CacheFill, max_window: int) -> None:
        self._writer = writer
        decompressor = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._stream = decompressor.stream_writer(
            cast(IO[bytes], writer), write_size=1 << 17, closefd=False
        )

    @property
    def decoded(self) -> int:
        return self._writer.written

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._stream.write(piece)


Sink = _Sink


def cache_sink(writer: CacheFill, *, zstd: bool, max_window: int) -> Sink:
    """Where the stored bytes of one blob go: straight into ``writer``, or through a zstd
    decoder that stops at the blob's size."""
    return _ZstdSink(writer, max_window) if zstd else _PlainSink(writer)


def _compressed_bound(size: int) -> int:
    """More than zstd ever needs for ``size`` bytes of incompressible input."""
    return size + size // 128 + 64 * 1024


def _copy(error: OcixError) -> OcixError:
    return type(error)(*error.args)


class Fetcher:
    """Gets blobs into ``cache`` from ``sources`` (mirror order). Flights run as tasks in
    ``nursery``; ``limiter`` bounds the worker threads (hashing, decompression, fsync)."""

    def __init__(
        self,
        sources: Sequence[Source],
        cache: Cache,
        config: FetchConfig = DEFAULT_FETCH_CONFIG,
        *,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
    ) -> None:
        if not sources:
            raise UsageError("no blob store given")
        self._sources = list(sources)
        self._cache = cache
        self._config = config
        self._nursery = nursery
        self._limiter = limiter
        self._scheduler = Scheduler(config.on_demand_slots, config.background_slots,
                                    host=cache.demand, on_held=self._wait_for_host)
        self._flights: dict[bytes, _Flight] = {}
        self._failures: dict[bytes, tuple[float, OcixError]] = {}
        self._source_failed_at: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}  # Retry-After: not before this trio time
        self._blobs_fetched = 0
        self._bytes_fetched = 0
        self._blobs_by_source: Counter[str] = Counter()
        self._bytes_by_source: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._failed_blobs = 0
        self._fast_failures = 0
        self._wait_timeouts = 0
        self._fetched_by_others = 0

    # --- public ---

    def in_flight(self, chunk: Chunk) -> bool:
        return chunk.digest in self._flights

    def start(self, chunk: Chunk, priority: Priority) -> bool:
        """Queue a fetch without waiting (no-op if cached, in flight or recently failed;
        an in-flight one is promoted to ``priority``). Returns whether it is in flight."""
        if self._recent_failure(chunk) is not None or self._cache.contains(chunk):
            return False
        self._flight(chunk, priority)
        return True

    async def ensure(
        self, chunk: Chunk, *, priority: Priority = Priority.ON_DEMAND, deadline: float = math.inf
    ) -> None:
        """Return once ``chunk`` is cached; wait at most until ``deadline`` (trio time).
        Always a checkpoint. Raises ``FetchError`` family or ``CacheError``."""
        if self._cache.contains(chunk):
            await trio.lowlevel.checkpoint()
            return
        failure = self._recent_failure(chunk)
        if failure is not None:
            self._fast_failures += 1
            await trio.lowlevel.checkpoint()
            raise failure
        flight = self._flight(chunk, priority)
        stuck = flight.abandoned_at > flight.progress
        if stuck and priority is Priority.ON_DEMAND:  # the kernel's retry of a timed-out READ
            self._fast_failures += 1
            await trio.lowlevel.checkpoint()
            raise FetchTimeout(f"blob {chunk.hex}: still no progress since the last deadline")
        if flight.carrier is not None and priority is Priority.ON_DEMAND:
            await self._wait_for_carrier(flight, deadline)
        with trio.move_on_at(deadline):
            await flight.done.wait()
        if not flight.done.is_set():
            self._wait_timeouts += 1
            flight.abandoned_at = trio.current_time()
            raise FetchTimeout(f"blob {chunk.hex}: not delivered within the deadline")
        if flight.error is not None:
            raise _copy(flight.error)

    def carry(self, chunk: Chunk, carrier: Carrier) -> bool:
        """Register ``chunk`` as in flight, brought by ``carrier``, which must end it with
        ``delivered`` or ``release``. False (nothing registered) when it is cached, in
        flight or failed recently."""
        if (chunk.digest in self._flights or self._cache.contains(chunk)
                or self._recent_failure(chunk) is not None):
            return False
        self._flights[chunk.digest] = _Flight(chunk, None, carrier=carrier)
        return True

    def carries(self, chunk: Chunk, carrier: Carrier) -> bool:
        """Whether ``carrier`` still holds ``chunk``'s flight (no waiter took it back)."""
        flight = self._flights.get(chunk.digest)
        return flight is not None and flight.carrier is carrier

    def hand_over(self, chunk: Chunk, carrier: Carrier, to: Carrier) -> None:
        """Let ``to`` carry ``chunk`` instead of ``carrier`` (if ``carrier`` holds it)."""
        if self.carries(chunk, carrier):
            self._flights[chunk.digest].carrier = to

    def delivered(self, chunk: Chunk, carrier: Carrier, source: str) -> None:
        """``carrier`` put ``chunk`` in the cache, verified, from ``source``: count it and
        wake the flight's waiters (if ``carrier`` still holds it)."""
        self._count_fetched(chunk, source)
        if self.carries(chunk, carrier):
            flight = self._flights.pop(chunk.digest)
            flight.done.set()

    def release(self, chunk: Chunk, carrier: Carrier) -> None:
        """``carrier`` will not bring ``chunk``: fetch it on its own (if ``carrier`` still
        holds it), at the priority its waiters asked for; they keep waiting on it."""
        flight = self._flights.get(chunk.digest)
        if flight is not None and flight.carrier is carrier:
            flight.carrier = None
            flight.progress = trio.current_time()
            flight.ticket = self._scheduler.submit(flight.wanted)
            self._nursery.start_soon(self._run, flight)

    def statistics(self) -> FetchStatistics:
        return FetchStatistics(
            blobs_fetched=self._blobs_fetched,
            bytes_fetched=self._bytes_fetched,
            blobs_by_source=dict(self._blobs_by_source),
            bytes_received_by_source=dict(self._bytes_by_source),
            errors=dict(self._errors),
            failed_blobs=self._failed_blobs,
            fast_failures=self._fast_failures,
            wait_timeouts=self._wait_timeouts,
            fetched_by_others=self._fetched_by_others,
            in_flight=len(self._flights),
            queued=self._scheduler.queued(),
        )

    # --- flights ---

    def _flight(self, chunk: Chunk, priority: Priority) -> _Flight:
        flight = self._flights.get(chunk.digest)
        if flight is None:
            flight = _Flight(chunk, self._scheduler.submit(priority))
            self._flights[chunk.digest] = flight
            self._nursery.start_soon(self._run, flight)
        elif flight.ticket is None:
            flight.wanted = min(flight.wanted, priority)
        else:
            self._scheduler.promote(flight.ticket, priority)
        return flight

    async def _wait_for_carrier(self, flight: _Flight, deadline: float) -> None:
        """Wait while ``flight``'s carrier keeps receiving bytes; when it has received none
        for ``pack_patience`` seconds, or a quarter of the deadline has passed, take the
        blob back (``release``) so it is fetched on its own."""
        give_up = min(deadline, trio.current_time() + self._config.deadline / 4)
        while (carrier := flight.carrier) is not None and not flight.done.is_set():
            with trio.move_on_at(min(give_up, carrier.progress + self._config.pack_patience)):
                await flight.done.wait()
            now = trio.current_time()
            stalled = now >= carrier.progress + self._config.pack_patience
            if flight.carrier is carrier and not flight.done.is_set() and (
                    stalled or now >= give_up):
                log.info("blob %s: its pack is too slow; fetching it on its own",
                         flight.chunk.hex)
                self.release(flight.chunk, carrier)

    def _wait_for_host(self) -> None:
        """Background fetches wait while other processes on the host fetch for waiting
        reads (``cache.demand``): look again every ``_HOST_POLL`` seconds until they may go."""

        async def poll() -> None:
            while self._scheduler.held_by_host:
                await trio.sleep(_HOST_POLL)
                self._scheduler.dispatch()

        self._nursery.start_soon(poll)

    def _recent_failure(self, chunk: Chunk) -> OcixError | None:
        entry = self._failures.get(chunk.digest)
        if entry is None:
            return None
        until, error = entry
        if trio.current_time() >= until:
            del self._failures[chunk.digest]
            return None
        return _copy(error)

    def _remember_failure(self, chunk: Chunk, error: OcixError) -> None:
        now = trio.current_time()
        if len(self._failures) > 10_000:
            self._failures = {k: v for k, v in self._failures.items() if v[0] > now}
        self._failures[chunk.digest] = (now + self._config.failure_memory, error)

    async def _run(self, flight: _Flight) -> None:
        """A flight's task. Never raises (an exception here would end the mount)."""
        chunk = flight.chunk
        flight.error = FetchError(f"blob {chunk.hex}: fetch cancelled")
        try:
            flight.error = await self._fly(flight)
            if flight.error is not None:
                self._failed_blobs += 1
                self._remember_failure(chunk, flight.error)
                log.warning("%s", flight.error)
        finally:
            del self._flights[chunk.digest]
            flight.done.set()

    async def _fly(self, flight: _Flight) -> OcixError | None:
        chunk = flight.chunk
        claim: FetchClaim | None = None
        try:
            self._cache.refuse_oversized(chunk)  # before a slot or a byte is spent on it
            assert flight.ticket is not None, "a carried flight has no task"
            budget = self._config.deadline + chunk.size / self._config.min_rate
            # The slot first, then the claim: a claim is only ever held by a flight that can
            # transfer at once. (Claimed first, a prefetch held back for another process's
            # on-demand read could hold the very blob that read waits for.)
            await self._scheduler.acquire(flight.ticket)
            try:
                claim = await self._claim_host_wide(chunk, budget)
                if claim is None:
                    return None
                with trio.move_on_after(budget) as scope:
                    await self._fetch(flight)
                if scope.cancelled_caught:
                    raise FetchTimeout(f"blob {chunk.hex}: no source delivered it in time")
            finally:
                self._scheduler.release(flight.ticket)
        except OcixError as exc:
            return exc
        except Exception as exc:
            log.exception("blob %s: unexpected error while fetching", chunk.hex)
            return FetchError(f"blob {chunk.hex}: internal error: {exc!r}")
        finally:
            if claim is not None:
                claim.release()
        return None

    async def _claim_host_wide(self, chunk: Chunk, budget: float) -> FetchClaim | None:
        """This process's claim on fetching ``chunk`` (``Cache.claim_fetch``), or None once
        another process on the host has put it in the cache. While another process holds
        the claim (only while it transfers) this waits for the blob or the claim; after
        ``budget`` seconds it fetches anyway, under a claim of no one (a holder bound by its
        own deadlines cannot keep it longer, but this never relies on that)."""
        give_up = trio.current_time() + budget
        pause = _CLAIM_POLL_FIRST
        waited = False
        while True:
            claim = self._cache.claim_fetch(chunk)
            if waited and self._cache.contains(chunk):  # (the claim may be free again by now)
                if claim is not None:
                    claim.release()
                self._fetched_by_others += 1
                return None
            if claim is not None:
                return claim
            if trio.current_time() >= give_up:
                log.info("blob %s: another process has been fetching it for %.0f s; "
                         "fetching it here too", chunk.hex, budget)
                return FetchClaim.held_by_no_one()
            waited = True
            await trio.sleep(pause)
            pause = min(2 * pause, _CLAIM_POLL_MAX)

    async def _fetch(self, flight: _Flight) -> None:
        chunk = flight.chunk
        failures: list[tuple[Source, AttemptFailed]] = []
        corrupt_from: set[str] = set()
        missing_from: set[str] = set()
        for round_ in range(max(1, self._config.rounds)):
            if round_:
                await self._pause_before_round(round_, missing_from, chunk, failures)
            for source in self._ordered_sources():
                if source.label in missing_from:
                    continue
                if self._retry_wait([source]) > 0:
                    asked = AttemptFailed(FailureKind.HTTP_STATUS, _ASKED_TO_WAIT)
                    failures.append((source, asked))
                    continue
                if self._cache.contains(chunk):  # another process or flight filled it
                    return
                try:
                    await self._attempt(source, flight, no_cache=source.label in corrupt_from)
                except AttemptFailed as failure:
                    failures.append((source, failure))
                    self._note_attempt_failure(source, chunk, failure)
                    if failure.kind is FailureKind.NOT_FOUND:
                        missing_from.add(source.label)
                    elif failure.kind is FailureKind.CORRUPT:
                        corrupt_from.add(source.label)
                    continue
                self._source_failed_at.pop(source.label, None)
                self._retry_at.pop(source.label, None)
                return
            if len(missing_from) == len(self._sources):
                break
        raise _summarise(chunk, failures)

    async def _pause_before_round(
        self,
        round_: int,
        missing_from: set[str],
        chunk: Chunk,
        failures: list[tuple[Source, AttemptFailed]],
    ) -> None:
        """Back off (jittered), or longer if every source still left asked to be left
        alone (``Retry-After``); give up at once if that is beyond this fetch's time."""
        delay = self._config.backoff * 2 ** (round_ - 1) * random.uniform(0.5, 1.0)
        left = [source for source in self._sources if source.label not in missing_from]
        wait = self._retry_wait(left)
        if wait > delay:
            if trio.current_time() + wait >= trio.current_effective_deadline():
                raise _summarise(chunk, failures)
            delay = wait
        await trio.sleep(delay)

    def _retry_wait(self, sources: Sequence[Source]) -> float:
        """Seconds until one of ``sources`` may be asked again (0: one may be now)."""
        now = trio.current_time()
        return max(0.0, min(
            (self._retry_at.get(source.label, -math.inf) - now for source in sources),
            default=0.0,
        ))

    def _ordered_sources(self) -> list[Source]:
        now = trio.current_time()
        penalty = self._config.source_penalty

        def sick(source: Source) -> bool:
            return now - self._source_failed_at.get(source.label, -math.inf) < penalty

        return sorted(self._sources, key=sick)  # stable: mirror order within each group

    def _note_attempt_failure(self, source: Source, chunk: Chunk, failure: AttemptFailed) -> None:
        self._errors[failure.kind.value] += 1
        if failure.kind is not FailureKind.NOT_FOUND:
            self._source_failed_at[source.label] = trio.current_time()
        if failure.retry_after is not None:
            self._retry_at[source.label] = trio.current_time() + failure.retry_after
        level = logging.WARNING if failure.kind is FailureKind.CORRUPT else logging.INFO
        log.log(level, "%s: blob %s: %s", source.label, chunk.hex, failure.message)

    async def _attempt(self, source: Source, flight: _Flight, *, no_cache: bool) -> None:
        """One source, one blob: the zstd sibling first if advertised, then the plain name."""
        if await source.wants_zstd():
            try:
                await self._transfer(source, flight, zstd=True, no_cache=no_cache)
                return
            except AttemptFailed as failure:
                if failure.kind is not FailureKind.NOT_FOUND:
                    raise
        await self._transfer(source, flight, zstd=False, no_cache=no_cache)

    async def _transfer(
        self, source: Source, flight: _Flight, *, zstd: bool, no_cache: bool
    ) -> None:
        chunk = flight.chunk
        writer = self._cache.fill(chunk)
        try:
            with attempt_errors():
                sink: _Sink
                if zstd:
                    sink = _ZstdSink(writer, self._config.zstd_max_window)
                    limit = _compressed_bound(chunk.size)
                else:
                    sink, limit = _PlainSink(writer), chunk.size
                name = blob_name(chunk.digest, zstd=zstd)
                async with source.body(name, no_cache=no_cache) as body:
                    tail = await self._pump(body, sink, limit, source, flight)

                def last_bytes() -> None:  # joined with the commit: one thread hop
                    sink.write(tail)
                    if sink.decoded != chunk.size:
                        raise AttemptFailed(
                            FailureKind.TRUNCATED,
                            f"body ended after {sink.decoded} of {chunk.size} bytes",
                        )

                await self._cache.commit(writer, first=last_bytes)
        finally:
            writer.abort()
        self._count_fetched(chunk, source.label)

    def _count_fetched(self, chunk: Chunk, source: str) -> None:
        self._blobs_fetched += 1
        self._bytes_fetched += chunk.size
        self._blobs_by_source[source] += 1

    async def _pump(
        self, body: Body, sink: _Sink, limit: int, source: Source, flight: _Flight
    ) -> list[bytes]:
        """Move body bytes to the sink in batches (one worker-thread hop per batch),
        enforcing the size limit and the minimum rate; return the last, unwritten batch."""
        batch: list[bytes] = []
        batched = received = 0
        started = trio.current_time()
        async for piece in body:
            received += len(piece)
            self._bytes_by_source[source.label] += len(piece)
            flight.progress = trio.current_time()
            if received > limit:
                raise AttemptFailed(FailureKind.CORRUPT, f"body longer than {limit} bytes")
            batch.append(piece)
            batched += len(piece)
            if batched >= self._config.write_batch:
                await trio.to_thread.run_sync(sink.write, batch, limiter=self._limiter)
                batch, batched = [], 0
            check_rate(self._config, received, started)
        return batch


def _summarise(chunk: Chunk, failures: list[tuple[Source, AttemptFailed]]) -> FetchError:
    """One error for a blob no source delivered, of the most telling kind."""
    seen: dict[str, None] = {}
    for source, failure in failures:
        seen.setdefault(f"{source.label}: {failure.message}")
    message = f"blob {chunk.hex}: " + "; ".join(seen)
    kinds = {failure.kind for _, failure in failures}
    if kinds == {FailureKind.NOT_FOUND}:
        return BlobNotFound(message)
    if FailureKind.CORRUPT in kinds:
        return BlobCorrupt(message)
    if kinds <= {FailureKind.TIMEOUT, FailureKind.SLOW}:
        return FetchTimeout(message)
    return FetchError(message)
