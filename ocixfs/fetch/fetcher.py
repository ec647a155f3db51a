"""Fetch blobs from the stores into the cache: mirrors, deadlines, priorities, one flight
per blob.

Stores are mirrors tried in order: ``http(s)://BASE`` (httpx) or ``file:///DIR`` (plain
files read in worker threads; a bare absolute path means the same). A blob is
``BASE/blobs/blake3/<hex>``; when ``BASE/ocix-store.json`` lists ``"zstd"`` the fetcher asks
for ``<hex>.zst`` first and falls back to the plain name on 404.

Contract:

- ``Fetcher.ensure(chunk, priority=..., deadline=...)`` returns once the blob is in the
  cache, verified, or raises ``FetchError`` (``BlobNotFound``, ``BlobCorrupt``,
  ``FetchTimeout``) or ``CacheError``. It never hangs: a waiter gives up at its
  ``deadline`` (trio time), and each fetch is bounded by ``deadline + size / min_rate``
  seconds, by the per-socket timeouts and by the minimum transfer rate.
- One flight per digest: concurrent requests for a blob share one transfer, run as a task
  in the fetcher's nursery (a waiter that gives up does not cancel it, so the bytes still
  land in the cache for the next read).
- Priorities: ``ON_DEMAND`` fetches have their own slots; lower priorities share a smaller
  pool, start only when no on-demand fetch is queued, best priority first, and a queued
  flight is promoted when an on-demand read joins it.
- A source that fails (connection, timeout, 5xx, bad bytes) is tried after the healthy
  ones for ``source_penalty`` seconds. A blob whose fetch failed fails fast for
  ``failure_memory`` seconds (the kernel retries a failed READ at once).
- A 429 or 503 with ``Retry-After`` (seconds or a date, at most an hour) keeps that source
  from being asked again before then; the next mirror is tried, and when none is left the
  fetch waits for the earliest one if that fits its time, else fails at once.
- Bytes stream into a ``BlobWriter`` in batches (hash + write, and zstd decompression,
  in worker threads). A body longer than the blob, or a zstd stream that decompresses to
  more, is cut and counted as corrupt; nothing unverified reaches the cache.
- HTTP clients come from ``transport`` (system CAs, proxies from the environment,
  credentials scoped to their URL, bounded redirects, never https→http); labels and
  messages never show credentials.
- httpx and ``OSError`` exceptions from sources are translated in one place
  (``_source_errors``); they never escape this module.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import heapq
import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import httpx
import trio
import zstandard

from ocixfs.cache.blobs import BlobWriter, Cache
from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import (
    BlobCorrupt,
    BlobNotFound,
    FetchError,
    FetchTimeout,
    OcixError,
    UsageError,
)
from ocixfs.image.format import Chunk
from ocixfs.store.http import async_client, describe, load_credentials, redact, ssl_context

__all__ = [
    "FetchStatistics",
    "Fetcher",
    "HttpClients",
    "Priority",
    "Source",
    "make_sources",
]

log = logging.getLogger(__name__)

_STORE_JSON_MAX = 64 * 1024
_MAX_RETRY_AFTER = 3600
_ASKED_TO_WAIT = "asked to retry later (Retry-After)"
_FILE_READ = 1 << 20


class Priority(enum.IntEnum):
    """Lower is more urgent. Only ``ON_DEMAND`` uses the on-demand slots."""

    ON_DEMAND = 0
    READAHEAD = 1
    PREFETCH = 2
    BACKGROUND = 3


class _Kind(enum.Enum):
    """Why one attempt at one source failed (the keys of ``FetchStatistics.errors``)."""

    NOT_FOUND = "not_found"
    CORRUPT = "corrupt"
    TRUNCATED = "truncated"
    TIMEOUT = "timeout"
    SLOW = "slow"
    CONNECTION = "connection"
    HTTP_STATUS = "http_status"


class _AttemptFailed(Exception):
    """One source could not deliver one blob. Internal: summarised into a FetchError."""

    def __init__(self, kind: _Kind, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


@contextlib.contextmanager
def _source_errors() -> Iterator[None]:
    """The fetcher's one translation boundary for what sources raise."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise _AttemptFailed(_Kind.TIMEOUT, f"timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise _AttemptFailed(_Kind.CONNECTION, describe(exc)) from exc
    except FileNotFoundError as exc:
        raise _AttemptFailed(_Kind.NOT_FOUND, "no such file") from exc
    except OSError as exc:
        raise _AttemptFailed(_Kind.CONNECTION, exc.strerror or str(exc)) from exc
    except zstandard.ZstdError as exc:
        raise _AttemptFailed(_Kind.CORRUPT, f"bad zstd stream: {exc}") from exc
    except BlobCorrupt as exc:
        raise _AttemptFailed(_Kind.CORRUPT, str(exc)) from exc


# --- sources -----------------------------------------------------------------------------


class _Body(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...


class Source(ABC):
    """One store. ``label`` names it in logs and statistics (no credentials)."""

    label: str

    def __init__(self, label: str) -> None:
        self.label = label
        self._zstd: bool | None = None
        self._zstd_retry_at = -math.inf
        self._discovery = trio.Lock()

    async def wants_zstd(self) -> bool:
        """Whether ``ocix-store.json`` advertises zstd (asked once; retried later after a
        network failure, meanwhile plain names are used). Raises nothing."""
        async with self._discovery:
            if self._zstd is None and trio.current_time() >= self._zstd_retry_at:
                try:
                    with _source_errors():
                        self._zstd = await self._discover()
                except _AttemptFailed as failure:
                    if failure.kind is _Kind.NOT_FOUND:
                        self._zstd = False
                    else:
                        self._zstd_retry_at = trio.current_time() + 30
                        log.debug("%s: ocix-store.json: %s", self.label, failure.message)
        return bool(self._zstd)

    @abstractmethod
    async def _discover(self) -> bool: ...

    @abstractmethod
    def body(self, name: str, *, no_cache: bool) -> contextlib.AbstractAsyncContextManager[_Body]:
        """Open ``blobs/blake3/<name>``; raises ``_AttemptFailed`` or what
        ``_source_errors`` translates."""


def _advertises_zstd(label: str, raw: bytes) -> bool:
    try:
        compression = json.loads(raw).get("compression", [])
    except (ValueError, AttributeError, RecursionError):
        log.warning("%s: ocix-store.json is not a JSON object; ignoring it", label)
        return False
    return isinstance(compression, list) and "zstd" in compression


class _HttpSource(Source):
    def __init__(self, base: str, clients: HttpClients) -> None:
        super().__init__(redact(base))
        self._base = base.rstrip("/")
        self._clients = clients

    async def _discover(self) -> bool:
        url = f"{self._base}/ocix-store.json"
        headers = {"Accept-Encoding": "identity"}
        async with (
            self._clients.lend(self._base) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code in (404, 410):
                return False
            if response.status_code != 200:
                raise _status_failure(response)
            raw = bytearray()
            async for piece in response.aiter_raw():
                raw += piece
                if len(raw) > _STORE_JSON_MAX:
                    raise _AttemptFailed(_Kind.CORRUPT, "ocix-store.json is too large")
        return _advertises_zstd(self.label, bytes(raw))

    @contextlib.asynccontextmanager
    async def body(self, name: str, *, no_cache: bool) -> AsyncIterator[_Body]:
        headers = {"Accept-Encoding": "identity"}
        if no_cache:
            headers["Cache-Control"] = "no-cache"
        url = f"{self._base}/blobs/blake3/{name}"
        async with (
            self._clients.lend(self._base) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            status = response.status_code
            if status in (404, 410):
                raise _AttemptFailed(_Kind.NOT_FOUND, f"HTTP {status}")
            if status != 200:
                raise _status_failure(response)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise _AttemptFailed(_Kind.HTTP_STATUS, f"unasked Content-Encoding {encoding}")
            yield response.aiter_raw()


def _status_failure(response: httpx.Response) -> _AttemptFailed:
    """An unexpected status; 429 and 503 carry the server's ``Retry-After``, if any."""
    status = response.status_code
    retry_after = None
    if status in (429, 503):
        retry_after = _retry_after_seconds(response.headers.get("retry-after"))
    shown = f"HTTP {status}" if retry_after is None else (
        f"HTTP {status}, retry after {retry_after:g} s"
    )
    return _AttemptFailed(_Kind.HTTP_STATUS, shown, retry_after=retry_after)


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` (delta-seconds or an HTTP date) as seconds from now, at most
    ``_MAX_RETRY_AFTER``; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), _MAX_RETRY_AFTER))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - time.time()), float(_MAX_RETRY_AFTER))


class _FilePieces:
    """Reads a local file in worker threads, ``_FILE_READ`` bytes at a time."""

    def __init__(self, file: BinaryIO, limiter: trio.CapacityLimiter) -> None:
        self._file = file
        self._limiter = limiter
        self._at_end = False

    def __aiter__(self) -> _FilePieces:
        return self

    async def __anext__(self) -> bytes:
        if self._at_end:
            raise StopAsyncIteration
        data = await trio.to_thread.run_sync(self._file.read, _FILE_READ, limiter=self._limiter)
        self._at_end = len(data) < _FILE_READ  # a regular file reads short only at its end
        if not data:
            raise StopAsyncIteration
        return data


class _FileSource(Source):
    def __init__(self, root: Path, limiter: trio.CapacityLimiter) -> None:
        super().__init__(f"file://{root}")
        self._root = root
        self._limiter = limiter

    async def _discover(self) -> bool:
        def load() -> bytes:
            with open(self._root / "ocix-store.json", "rb") as file:
                return file.read(_STORE_JSON_MAX + 1)

        raw = await trio.to_thread.run_sync(load, limiter=self._limiter)
        return len(raw) <= _STORE_JSON_MAX and _advertises_zstd(self.label, raw)

    @contextlib.asynccontextmanager
    async def body(self, name: str, *, no_cache: bool) -> AsyncIterator[_Body]:
        path = self._root / "blobs" / "blake3" / name
        file = await trio.to_thread.run_sync(_open_rb, path, limiter=self._limiter)
        try:
            yield _FilePieces(file, self._limiter)
        finally:
            file.close()


def _open_rb(path: Path) -> BinaryIO:
    return open(path, "rb", buffering=0)  # noqa: SIM115 -- closed by the caller


class HttpClients:
    """The fetcher's HTTP clients (see ``transport``: system CAs plus ``ca_file``, proxies
    from the environment, scoped credentials, a few redirects but never https→http), each
    with a single keep-alive connection and lent for one request at a time: per store,
    last returned first out, so a warm connection is reused before a cold one.

    One client with a pool of N connections costs more: httpcore re-examines every
    connection of its pool (polling each idle socket) on every request and every response;
    lending single-connection clients took 7 % off the CPU and the wall time of 1,000
    small-blob prefetches. The fetch slots bound how many clients are ever lent at once.
    Use as an async context manager; leaving it closes every client it made."""

    def __init__(self, config: FetchConfig = DEFAULT_FETCH_CONFIG) -> None:
        self._config = config
        self._limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._idle: dict[str, list[httpx.AsyncClient]] = {}
        self._made: list[httpx.AsyncClient] = []
        ssl_context(config.ca_file)  # a bad CA or credentials file fails now, not at a read
        self._auth = load_credentials(config.auth_file)  # read once, shared by every client

    @contextlib.asynccontextmanager
    async def lend(self, store: str) -> AsyncIterator[httpx.AsyncClient]:
        """A client for one request to ``store``; it goes back when the block ends, even
        cancelled (httpx closes a connection whose response was not read to the end)."""
        idle = self._idle.setdefault(store, [])
        client = idle.pop() if idle else self._new_client()
        try:
            yield client
        finally:
            idle.append(client)

    def _new_client(self) -> httpx.AsyncClient:
        client = async_client(self._config, limits=self._limits, auth=self._auth)
        self._made.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._made:
            await client.aclose()
        self._made.clear()
        self._idle.clear()

    async def __aenter__(self) -> HttpClients:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()


def make_sources(
    stores: Sequence[str | Path],
    *,
    clients: HttpClients | None,
    limiter: trio.CapacityLimiter,
) -> list[Source]:
    """Sources for ``stores.parse_stores`` output; http(s) stores need ``clients``."""
    sources: list[Source] = []
    for store in stores:
        if isinstance(store, Path):
            sources.append(_FileSource(store, limiter))
        elif clients is None:
            raise UsageError(f"store {store!r} needs HTTP clients")
        else:
            sources.append(_HttpSource(store, clients))
    return sources


# --- scheduling --------------------------------------------------------------------------


class _Ticket:
    __slots__ = ("abandoned", "granted", "priority", "seq", "slot_on_demand")

    def __init__(self, priority: Priority, seq: int) -> None:
        self.priority = priority
        self.seq = seq
        self.granted = trio.Event()
        self.abandoned = False
        self.slot_on_demand: bool | None = None  # None: holds no slot


class _Scheduler:
    """Fetch slots. On-demand tickets are served FIFO from their own slots; the others
    from a separate pool, best priority (then oldest) first, and only while no on-demand
    ticket waits. Code between awaits is atomic under trio, so there are no locks."""

    def __init__(self, on_demand_slots: int, background_slots: int) -> None:
        self._free_on_demand = max(1, on_demand_slots)
        self._free_background = max(1, background_slots)
        self._on_demand: deque[_Ticket] = deque()
        self._background: list[tuple[int, int, _Ticket]] = []
        self._seq = 0

    def submit(self, priority: Priority) -> _Ticket:
        """Queue a request now (so submission order is service order within a priority);
        the ticket may be granted at once."""
        self._seq += 1
        ticket = _Ticket(priority, self._seq)
        self._enqueue(ticket)
        self._dispatch()
        return ticket

    async def acquire(self, ticket: _Ticket) -> None:
        """Wait until ``ticket`` holds a slot; if cancelled, give up its place or slot."""
        try:
            await ticket.granted.wait()
        except BaseException:
            if ticket.slot_on_demand is None:
                ticket.abandoned = True
            else:
                self.release(ticket)
            raise

    def release(self, ticket: _Ticket) -> None:
        if ticket.slot_on_demand is True:
            self._free_on_demand += 1
        elif ticket.slot_on_demand is False:
            self._free_background += 1
        ticket.slot_on_demand = None
        self._dispatch()

    def promote(self, ticket: _Ticket, priority: Priority) -> None:
        """Raise a queued ticket's priority (no effect once it holds a slot)."""
        if priority >= ticket.priority or ticket.granted.is_set():
            return
        ticket.priority = priority  # its old heap entry is now stale and will be skipped
        self._enqueue(ticket)
        self._dispatch()

    def queued(self) -> int:
        waiting = {id(t) for t in self._on_demand if self._live(t, t.priority)}
        waiting |= {id(t) for p, _, t in self._background if self._live(t, p)}
        return len(waiting)

    def _enqueue(self, ticket: _Ticket) -> None:
        if ticket.priority is Priority.ON_DEMAND:
            self._on_demand.append(ticket)
        else:
            heapq.heappush(self._background, (ticket.priority, ticket.seq, ticket))

    @staticmethod
    def _live(ticket: _Ticket, priority: int) -> bool:
        return not ticket.abandoned and not ticket.granted.is_set() and ticket.priority == priority

    def _dispatch(self) -> None:
        while self._on_demand and self._free_on_demand:
            ticket = self._on_demand.popleft()
            if self._live(ticket, Priority.ON_DEMAND):
                self._free_on_demand -= 1
                self._grant(ticket, on_demand=True)
        while self._on_demand and not self._live(self._on_demand[0], Priority.ON_DEMAND):
            self._on_demand.popleft()
        if self._on_demand:
            return
        while self._background and self._free_background:
            priority, _, ticket = heapq.heappop(self._background)
            if self._live(ticket, priority):
                self._free_background -= 1
                self._grant(ticket, on_demand=False)

    @staticmethod
    def _grant(ticket: _Ticket, *, on_demand: bool) -> None:
        ticket.slot_on_demand = on_demand
        ticket.granted.set()


# --- the fetcher -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchStatistics:
    """A snapshot. ``errors`` counts failed attempts by kind (one blob may fail at several
    sources); ``failed_blobs`` counts blobs no source delivered; ``fast_failures`` requests
    answered from the recent-failure memory; ``wait_timeouts`` waiters that gave up. Byte
    and blob counts are of verified content; ``bytes_received_by_source`` counts what came
    over the wire (compressed, failed attempts included)."""

    blobs_fetched: int
    bytes_fetched: int
    blobs_by_source: dict[str, int]
    bytes_received_by_source: dict[str, int]
    errors: dict[str, int]
    failed_blobs: int
    fast_failures: int
    wait_timeouts: int
    in_flight: int
    queued: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, in field order (copies of the mappings)."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            out[item.name] = dict(value) if isinstance(value, dict) else value
        return out


@dataclass(slots=True)
class _Flight:
    """One blob's fetch. ``progress``: when it last received body bytes (or started);
    ``abandoned_at``: when a waiter last gave up on it."""

    chunk: Chunk
    ticket: _Ticket
    done: trio.Event = field(default_factory=trio.Event)
    error: OcixError | None = None
    progress: float = field(default_factory=trio.current_time)
    abandoned_at: float = -math.inf


class _Sink(Protocol):
    @property
    def decoded(self) -> int: ...

    def write(self, pieces: list[bytes]) -> None: ...


class _PlainSink:
    def __init__(self, writer: BlobWriter) -> None:
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

    def __init__(self, writer: BlobWriter, max_window: int) -> None:
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
        self._scheduler = _Scheduler(config.on_demand_slots, config.background_slots)
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
        with trio.move_on_at(deadline):
            await flight.done.wait()
        if not flight.done.is_set():
            self._wait_timeouts += 1
            flight.abandoned_at = trio.current_time()
            raise FetchTimeout(f"blob {chunk.hex}: not delivered within the deadline")
        if flight.error is not None:
            raise _copy(flight.error)

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
        else:
            self._scheduler.promote(flight.ticket, priority)
        return flight

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
        try:
            await self._scheduler.acquire(flight.ticket)
            try:
                budget = self._config.deadline + chunk.size / self._config.min_rate
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
        return None

    async def _fetch(self, flight: _Flight) -> None:
        chunk = flight.chunk
        failures: list[tuple[Source, _AttemptFailed]] = []
        corrupt_from: set[str] = set()
        missing_from: set[str] = set()
        for round_ in range(max(1, self._config.rounds)):
            if round_:
                await self._pause_before_round(round_, missing_from, chunk, failures)
            for source in self._ordered_sources():
                if source.label in missing_from:
                    continue
                if self._retry_wait([source]) > 0:
                    failures.append((source, _AttemptFailed(_Kind.HTTP_STATUS, _ASKED_TO_WAIT)))
                    continue
                if self._cache.contains(chunk):  # another process or flight filled it
                    return
                try:
                    await self._attempt(source, flight, no_cache=source.label in corrupt_from)
                except _AttemptFailed as failure:
                    failures.append((source, failure))
                    self._note_attempt_failure(source, chunk, failure)
                    if failure.kind is _Kind.NOT_FOUND:
                        missing_from.add(source.label)
                    elif failure.kind is _Kind.CORRUPT:
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
        failures: list[tuple[Source, _AttemptFailed]],
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

    def _note_attempt_failure(self, source: Source, chunk: Chunk, failure: _AttemptFailed) -> None:
        self._errors[failure.kind.value] += 1
        if failure.kind is not _Kind.NOT_FOUND:
            self._source_failed_at[source.label] = trio.current_time()
        if failure.retry_after is not None:
            self._retry_at[source.label] = trio.current_time() + failure.retry_after
        level = logging.WARNING if failure.kind is _Kind.CORRUPT else logging.INFO
        log.log(level, "%s: blob %s: %s", source.label, chunk.hex, failure.message)

    async def _attempt(self, source: Source, flight: _Flight, *, no_cache: bool) -> None:
        """One source, one blob: the zstd sibling first if advertised, then the plain name."""
        if await source.wants_zstd():
            try:
                await self._transfer(source, flight, zstd=True, no_cache=no_cache)
                return
            except _AttemptFailed as failure:
                if failure.kind is not _Kind.NOT_FOUND:
                    raise
        await self._transfer(source, flight, zstd=False, no_cache=no_cache)

    async def _transfer(
        self, source: Source, flight: _Flight, *, zstd: bool, no_cache: bool
    ) -> None:
        chunk = flight.chunk
        writer = self._cache.writer(chunk)
        try:
            with _source_errors():
                sink: _Sink
                if zstd:
                    sink = _ZstdSink(writer, self._config.zstd_max_window)
                    name, limit = f"{chunk.hex}.zst", _compressed_bound(chunk.size)
                else:
                    sink, name, limit = _PlainSink(writer), chunk.hex, chunk.size
                async with source.body(name, no_cache=no_cache) as body:
                    tail = await self._pump(body, sink, limit, source, flight)

                def last_bytes() -> None:  # joined with the commit: one thread hop
                    sink.write(tail)
                    if sink.decoded != chunk.size:
                        raise _AttemptFailed(
                            _Kind.TRUNCATED,
                            f"body ended after {sink.decoded} of {chunk.size} bytes",
                        )

                await self._cache.commit(writer, first=last_bytes)
        finally:
            writer.abort()
        self._blobs_fetched += 1
        self._bytes_fetched += chunk.size
        self._blobs_by_source[source.label] += 1

    async def _pump(
        self, body: _Body, sink: _Sink, limit: int, source: Source, flight: _Flight
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
                raise _AttemptFailed(_Kind.CORRUPT, f"body longer than {limit} bytes")
            batch.append(piece)
            batched += len(piece)
            if batched >= self._config.write_batch:
                await trio.to_thread.run_sync(sink.write, batch, limiter=self._limiter)
                batch, batched = [], 0
            self._check_rate(received, started)
        return batch

    def _check_rate(self, received: int, started: float) -> None:
        elapsed = trio.current_time() - started
        if elapsed > self._config.rate_window and received < self._config.min_rate * elapsed:
            raise _AttemptFailed(
                _Kind.SLOW, f"{received / elapsed:.0f} B/s is below the minimum rate"
            )


def _summarise(chunk: Chunk, failures: list[tuple[Source, _AttemptFailed]]) -> FetchError:
    """One error for a blob no source delivered, of the most telling kind."""
    seen: dict[str, None] = {}
    for source, failure in failures:
        seen.setdefault(f"{source.label}: {failure.message}")
    message = f"blob {chunk.hex}: " + "; ".join(seen)
    kinds = {failure.kind for _, failure in failures}
    if kinds == {_Kind.NOT_FOUND}:
        return BlobNotFound(message)
    if _Kind.CORRUPT in kinds:
        return BlobCorrupt(message)
    if kinds <= {_Kind.TIMEOUT, _Kind.SLOW}:
        return FetchTimeout(message)
    return FetchError(message)
