"""Reading blobs from stores: one ``Source`` per store, whatever its kind.

``open_sources(stores, config, limiter)`` (an async context manager) turns ``StoreSpec``
values into ``Source`` objects, in mirror order, and ``probe`` takes one blocking look at a
store before a mount; these two ``match`` statements are the only places that map a store
kind to the code that reads it. HTTP stores share ``HttpClients``, a pool of
single-connection clients lent one request at a time. A ``Source`` knows where a blob
lives in its store (``layout``), whether the store advertises ``.zst`` siblings
(``ocix-store.json``, asked once), and how to open a blob's body as an async stream of
bytes. It does not verify, retry or schedule: that is the fetcher's job.

Failures of one attempt are ``AttemptFailed`` with a ``FailureKind``. ``attempt_errors()``
is the one translation boundary for what reading a store can raise (httpx, ``OSError``,
zstd, a corrupt write); nothing else escapes to the fetcher.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from typing import BinaryIO, Protocol, assert_never

import httpx
import trio
import zstandard

from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import BlobCorrupt, StoreError
from ocixfs.http import (
    PROXIES,
    ROUTE_FAILURES,
    ProxyGroup,
    async_client,
    credentials_of,
    describe,
    ssl_context,
    stream,
)
from ocixfs.image.loading import open_regular
from ocixfs.store.layout import (
    STORE_CONFIG,
    STORE_CONFIG_MAX,
    advertises_zstd,
    parse_blob_name,
    parse_store_config,
)
from ocixfs.store.registry import (
    DigestCheck,
    StoredBlob,
    blob_url,
    load_blob_table,
    probe_registry,
    pull_scope,
)
from ocixfs.store.registryauth import RegistryAuth, RegistryError
from ocixfs.store.spec import HttpStore, LocalStore, RegistryStore, StoreSpec

__all__ = [
    "AttemptFailed",
    "Body",
    "FailureKind",
    "HttpClients",
    "Source",
    "attempt_errors",
    "check_rate",
    "open_sources",
    "probe",
]

log = logging.getLogger(__name__)

_MAX_RETRY_AFTER = 3600
_FILE_READ = 1 << 20
_DISCOVERY_RETRY = 30.0


class FailureKind(enum.Enum):
    """Why one attempt at one source failed (the keys of ``FetchStatistics.errors``)."""

    NOT_FOUND = "not_found"
    CORRUPT = "corrupt"
    TRUNCATED = "truncated"
    TIMEOUT = "timeout"
    SLOW = "slow"
    CONNECTION = "connection"
    HTTP_STATUS = "http_status"


class AttemptFailed(Exception):
    """One source could not deliver one blob (the fetcher sums these up into a FetchError)."""

    def __init__(
        self, kind: FailureKind, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


@contextlib.contextmanager
def attempt_errors() -> Iterator[None]:
    """The one translation boundary for what reading a store (and filling the cache from
    it) raises: each becomes ``AttemptFailed`` of the kind that tells what went wrong."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise AttemptFailed(FailureKind.TIMEOUT, f"timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise AttemptFailed(FailureKind.CONNECTION, describe(exc)) from exc
    except FileNotFoundError as exc:
        raise AttemptFailed(FailureKind.NOT_FOUND, "no such file") from exc
    except OSError as exc:
        raise AttemptFailed(FailureKind.CONNECTION, exc.strerror or str(exc)) from exc
    except zstandard.ZstdError as exc:
        raise AttemptFailed(FailureKind.CORRUPT, f"bad zstd stream: {exc}") from exc
    except BlobCorrupt as exc:
        raise AttemptFailed(FailureKind.CORRUPT, str(exc)) from exc


def check_rate(config: FetchConfig, received: int, started: float) -> None:
    """Raise ``AttemptFailed`` (``SLOW``) when a transfer that began at trio time
    ``started`` breaks the minimum-rate rule (``FetchConfig.too_slow``)."""
    elapsed = trio.current_time() - started
    if config.too_slow(received, elapsed):
        raise AttemptFailed(
            FailureKind.SLOW, f"{received / elapsed:.0f} B/s is below the minimum rate"
        )


class Body(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...


class Source(ABC):
    """One store. ``label`` names it in logs and statistics (no credentials); ``config``
    gives the timeouts and the minimum rate of its transfers."""

    label: str

    def __init__(self, label: str, config: FetchConfig) -> None:
        self.label = label
        self.config = config
        self._zstd: bool | None = None
        self._zstd_retry_at = -math.inf
        self._discovery = trio.Lock()

    async def wants_zstd(self) -> bool:
        """Whether ``ocix-store.json`` advertises zstd (asked once; retried later after a
        failure, meanwhile plain names are used, which every store has). Raises nothing.

        Discovery follows the rules of a blob transfer (per-socket timeouts, the minimum
        rate after ``rate_window``) and takes at most ``discovery_budget`` seconds in all,
        so a store that drips its configuration delays the fetches waiting for it by that
        much, leaving them the time to fetch from it by plain name or from the next mirror."""
        async with self._discovery:
            if self._zstd is None and trio.current_time() >= self._zstd_retry_at:
                with trio.move_on_after(self.discovery_budget) as scope:
                    try:
                        with attempt_errors():
                            self._zstd = self._advertises_zstd(await self._read_config())
                    except AttemptFailed as failure:
                        self._discovery_failed(failure)
                if scope.cancelled_caught:
                    self._discovery_failed(AttemptFailed(
                        FailureKind.TIMEOUT, f"not received within {self.discovery_budget:g} s"
                    ))
        return bool(self._zstd)

    @property
    def discovery_budget(self) -> float:
        """Seconds ``ocix-store.json`` may take: the rate window, then the largest one at
        the minimum rate."""
        return self.config.rate_window + STORE_CONFIG_MAX / self.config.min_rate

    def _discovery_failed(self, failure: AttemptFailed) -> None:
        if failure.kind is FailureKind.NOT_FOUND:
            self._zstd = False
            return
        self._zstd_retry_at = trio.current_time() + _DISCOVERY_RETRY
        log.info("%s: %s: %s; using plain names for %g s", self.label, STORE_CONFIG,
                 failure.message, _DISCOVERY_RETRY)

    def _advertises_zstd(self, raw: bytes) -> bool:
        try:
            return advertises_zstd(parse_store_config(raw, f"{self.label}: {STORE_CONFIG}"))
        except StoreError as exc:
            log.warning("%s; ignoring it", exc)
            return False

    @abstractmethod
    async def _read_config(self) -> bytes:
        """The bytes of the store's ``ocix-store.json`` (at most ``STORE_CONFIG_MAX + 1``);
        raises ``AttemptFailed`` (``NOT_FOUND`` when there is none) or what
        ``attempt_errors`` translates."""

    @abstractmethod
    def body(self, name: str, *, no_cache: bool) -> contextlib.AbstractAsyncContextManager[Body]:
        """Open the blob at ``name`` (``layout.blob_name``) for reading; ``no_cache`` asks
        caches in between for a fresh copy. Raises ``AttemptFailed`` or what
        ``attempt_errors`` translates."""


class _HttpSource(Source):
    def __init__(self, store: HttpStore, clients: HttpClients, config: FetchConfig) -> None:
        super().__init__(store.label, config)
        self._base = store.url.rstrip("/")
        self._clients = clients

    async def _read_config(self) -> bytes:
        url = f"{self._base}/{STORE_CONFIG}"
        headers = {"Accept-Encoding": "identity"}
        async with self._clients.stream(self._base, url, headers) as response:
            if response.status_code in (404, 410):
                raise AttemptFailed(FailureKind.NOT_FOUND, f"HTTP {response.status_code}")
            if response.status_code != 200:
                raise _status_failure(response)
            raw = bytearray()
            started = trio.current_time()
            async for piece in response.aiter_raw():
                raw += piece
                if len(raw) > STORE_CONFIG_MAX:
                    break
                check_rate(self.config, len(raw), started)
        return bytes(raw)

    @contextlib.asynccontextmanager
    async def body(self, name: str, *, no_cache: bool) -> AsyncIterator[Body]:
        headers = {"Accept-Encoding": "identity"}
        if no_cache:
            headers["Cache-Control"] = "no-cache"
        async with self._clients.stream(self._base, f"{self._base}/{name}",
                                        headers) as response:
            status = response.status_code
            if status in (404, 410):
                raise AttemptFailed(FailureKind.NOT_FOUND, f"HTTP {status}")
            if status != 200:
                raise _status_failure(response)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise AttemptFailed(
                    FailureKind.HTTP_STATUS, f"unasked Content-Encoding {encoding}"
                )
            yield response.aiter_raw()


def probe(store: StoreSpec, config: FetchConfig, *, timeout: float) -> str | None:
    """One quick, blocking look at a store before a mount relies on it: a GET of its
    ``ocix-store.json`` (for a local store, that its directory exists; for a registry,
    that its artifact manifest can be read), each network step
    bounded by ``timeout`` seconds. Returns None when the store answered (a 404 is an
    answer: the file is optional), else why not, in a few words (no credentials)."""
    match store:
        case LocalStore():
            return None if store.path.is_dir() else "no such directory"
        case HttpStore():
            return _probe_http(store, replace(config, connect_timeout=timeout,
                                              read_timeout=timeout))
        case RegistryStore():
            return probe_registry(store, replace(config, connect_timeout=timeout,
                                                 read_timeout=timeout))
        case _:
            assert_never(store)


def _probe_http(store: HttpStore, quick: FetchConfig) -> str | None:
    try:
        with stream(quick, f"{store.url.rstrip('/')}/{STORE_CONFIG}",
                    headers={"Accept-Encoding": "identity"},
                    group=ProxyGroup()) as response:  # a 2 s look judges no proxy
            status = response.status_code
    except httpx.HTTPError as exc:
        return describe(exc)
    return f"HTTP {status}" if status in (401, 407) or status >= 500 else None


def _status_failure(response: httpx.Response) -> AttemptFailed:
    """An unexpected status; 429 and 503 carry the server's ``Retry-After``, if any."""
    status = response.status_code
    retry_after = None
    if status in (429, 503):
        retry_after = _retry_after_seconds(response.headers.get("retry-after"))
    shown = f"HTTP {status}" if retry_after is None else (
        f"HTTP {status}, retry after {retry_after:g} s"
    )
    return AttemptFailed(FailureKind.HTTP_STATUS, shown, retry_after=retry_after)


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
    def __init__(
        self, store: LocalStore, limiter: trio.CapacityLimiter, config: FetchConfig
    ) -> None:
        super().__init__(store.label, config)
        self._root = store.path
        self._limiter = limiter

    async def _read_config(self) -> bytes:
        def load() -> bytes:
            with open_regular(self._root / STORE_CONFIG) as file:
                return file.read(STORE_CONFIG_MAX + 1)

        return await trio.to_thread.run_sync(load, limiter=self._limiter)

    @contextlib.asynccontextmanager
    async def body(self, name: str, *, no_cache: bool) -> AsyncIterator[Body]:
        path = self._root / name
        file = await trio.to_thread.run_sync(open_regular, path, 0, limiter=self._limiter)
        try:
            yield _FilePieces(file, self._limiter)
        finally:
            file.close()


class _RegistrySource(Source):
    """An artifact in an OCI registry (``store.registry``): the blob table is loaded once
    (in a worker thread, by the blocking client; again after a failure), and a blob is
    served only in the encoding the table gives, its sha256 checked before the last piece
    is handed on (the fetcher then checks its BLAKE3 as for any store)."""

    def __init__(
        self, store: RegistryStore, config: FetchConfig, limiter: trio.CapacityLimiter
    ) -> None:
        super().__init__(store.label, config)
        self._store = store
        self._limiter = limiter
        self._auth = RegistryAuth(store)
        slots = config.on_demand_slots + config.background_slots
        self._client = async_client(config, auth=self._auth, limits=httpx.Limits(
            max_connections=slots, max_keepalive_connections=slots))
        self._table: dict[str, StoredBlob] | None = None
        self._table_lock = trio.Lock()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _blobs(self) -> dict[str, StoredBlob]:
        async with self._table_lock:
            if self._table is None:
                with _registry_attempt():
                    self._table = await trio.to_thread.run_sync(
                        load_blob_table, self._store, self.config, self._auth,
                        limiter=self._limiter, abandon_on_cancel=True)
            return self._table

    async def _read_config(self) -> bytes:
        if not any(stored.zstd for stored in (await self._blobs()).values()):
            raise AttemptFailed(FailureKind.NOT_FOUND, "no blob is stored compressed")
        return json.dumps({"compression": ["zstd"]}).encode()

    @contextlib.asynccontextmanager
    async def body(self, name: str, *, no_cache: bool) -> AsyncIterator[Body]:
        try:
            digest, zstd = parse_blob_name(name)
        except ValueError:  # a profile pack: an artifact holds blobs only
            raise AttemptFailed(FailureKind.NOT_FOUND, "not a blob of the artifact") from None
        stored = (await self._blobs()).get(digest)
        if stored is None or stored.zstd != zstd:
            raise AttemptFailed(FailureKind.NOT_FOUND, "not in the artifact's blob index")
        headers = {"Accept-Encoding": "identity", **({"Cache-Control": "no-cache"}
                                                     if no_cache else {})}
        with _registry_attempt():
            async with self._client.stream("GET", blob_url(self._store, stored.digest),
                                           headers=headers,
                                           extensions=pull_scope(self._store)) as response:
                if response.status_code in (404, 410):
                    raise AttemptFailed(FailureKind.NOT_FOUND, f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise _status_failure(response)
                yield _Sha256Checked(response.aiter_raw(), stored, self._limiter)


@contextlib.contextmanager
def _registry_attempt() -> Iterator[None]:
    """A registry's refusal (token service, unknown tag, bad manifest) as an attempt's."""
    try:
        yield
    except RegistryError as exc:
        kind = FailureKind.NOT_FOUND if exc.not_found else FailureKind.HTTP_STATUS
        raise AttemptFailed(kind, str(exc)) from exc


class _Sha256Checked:
    """The body of a registry blob, passed on piece by piece while its sha256 is computed
    (in worker threads, ``_FILE_READ`` bytes at a time); at the end a body that is not
    the indexed blob fails the attempt as ``CORRUPT`` before the fetcher commits it."""

    def __init__(
        self, pieces: AsyncIterator[bytes], stored: StoredBlob, limiter: trio.CapacityLimiter
    ) -> None:
        self._pieces = pieces
        self._check = DigestCheck(stored.digest, stored.size)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._limiter = limiter

    def __aiter__(self) -> _Sha256Checked:
        return self

    async def __anext__(self) -> bytes:
        try:
            piece = await self._pieces.__anext__()
        except StopAsyncIteration:
            await self._hash_pending()
            problem = self._check.problem()
            if problem is not None:
                raise AttemptFailed(FailureKind.CORRUPT, problem) from None
            raise
        too_many = self._check.count(len(piece))
        if too_many is not None:
            raise AttemptFailed(FailureKind.CORRUPT, too_many)
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size >= _FILE_READ:
            await self._hash_pending()
        return piece

    async def _hash_pending(self) -> None:
        pending, self._pending, self._pending_size = self._pending, [], 0
        await trio.to_thread.run_sync(self._check.update, pending, limiter=self._limiter)


class HttpClients:
    """The fetcher's HTTP clients (see ``ocixfs.http``: system CAs plus ``ca_file``, the
    proxy group or the environment's proxies, scoped credentials, a few redirects but never
    https→http), each with a single keep-alive connection and lent for one request at a
    time: per store and route, last returned first out, so a warm connection is reused
    before a cold one.

    One client with a pool of N connections costs more: httpcore re-examines every
    connection of its pool (polling each idle socket) on every request and every response;
    lending single-connection clients took 7 % off the CPU and the wall time of 1,000
    small-blob prefetches. The fetch slots bound how many clients are ever lent at once.
    Use as an async context manager; leaving it closes every client it made."""

    def __init__(self, config: FetchConfig = DEFAULT_FETCH_CONFIG) -> None:
        self._config = config
        self._limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._idle: dict[tuple[str, str], list[httpx.AsyncClient]] = {}
        self._made: list[httpx.AsyncClient] = []
        ssl_context(config.ca_file)  # a bad CA or credentials file fails now, not at a read
        self._auth = credentials_of(config)  # shared by every client

    @contextlib.asynccontextmanager
    async def stream(
        self, store: str, url: str, headers: dict[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """``GET url`` (under ``store``) by the routes of ``PROXIES.routes``, as
        ``ocixfs.http.stream`` does: a route that fails before the answer is marked down
        and the next tried in the same attempt; one that fails in the body is marked down
        and the error raised (the fetcher's next round takes the next route)."""
        routes = PROXIES.routes(self._config, url)
        for number, route in enumerate(routes, 1):
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(self._lend(store, route))
                try:
                    response = await stack.enter_async_context(
                        client.stream("GET", url, headers=headers))
                except ROUTE_FAILURES as exc:
                    PROXIES.failed(route, self._config, exc)
                    if number == len(routes):
                        raise
                    continue
                with PROXIES.watching(route, self._config):
                    yield response
                return

    @contextlib.asynccontextmanager
    async def _lend(self, store: str, route: str) -> AsyncIterator[httpx.AsyncClient]:
        """A client for one request to ``store`` by ``route``; it goes back when the block
        ends, even cancelled (httpx closes a connection whose response was not read to the
        end)."""
        idle = self._idle.setdefault((store, route), [])
        client = idle.pop() if idle else self._new_client(route)
        try:
            yield client
        finally:
            idle.append(client)

    def _new_client(self, route: str) -> httpx.AsyncClient:
        client = async_client(self._config, limits=self._limits, auth=self._auth, route=route)
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


@contextlib.asynccontextmanager
async def open_sources(
    stores: Sequence[StoreSpec], config: FetchConfig, *, limiter: trio.CapacityLimiter
) -> AsyncIterator[list[Source]]:
    """A ``Source`` for each store, in mirror order. HTTP clients are made only when a
    store needs them, and closed on exit. ``limiter`` bounds the worker threads of local
    reads. Raises ``UsageError`` for an unusable CA or credentials file."""
    async with contextlib.AsyncExitStack() as stack:
        clients: HttpClients | None = None
        sources: list[Source] = []
        for store in stores:
            match store:
                case LocalStore():
                    sources.append(_FileSource(store, limiter, config))
                case HttpStore():
                    if clients is None:
                        clients = await stack.enter_async_context(HttpClients(config))
                    sources.append(_HttpSource(store, clients, config))
                case RegistryStore():
                    source = _RegistrySource(store, config, limiter)
                    stack.push_async_callback(source.aclose)
                    sources.append(source)
                case _:
                    assert_never(store)
        yield sources
