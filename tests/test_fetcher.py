"""The fetcher against real HTTP servers that misbehave (tests/faultserver.py)."""

from __future__ import annotations

import functools
import os
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import zstandard

from ocixfs.cache.blobs import Cache
from ocixfs.cache.demand import HostDemand
from ocixfs.config import CacheConfig, CacheQuota, FetchConfig
from ocixfs.errors import BlobCorrupt, BlobNotFound, CacheFullError, FetchError, FetchTimeout
from ocixfs.fetch.fetcher import Priority
from ocixfs.image.format import Chunk
from tests.faultserver import Fault, FaultServer, blob_path, make_store
from tests.servers import FaultServers, Mirrors, Store, blob_store, cached, fetching_with

FAST = FetchConfig(
    deadline=5.0,
    connect_timeout=1.0,
    read_timeout=0.5,
    backoff=0.01,
    failure_memory=5.0,
    threads=4,
)
CONTENTS = [os.urandom(n) for n in (70_000, 1, 5_000, 3_000_000)]
fetching = fetching_with(FAST)


@pytest.fixture
def blob_contents() -> list[bytes]:
    """What the ``store`` fixture (and ``server``, ``mirrors``) of tests/conftest.py hold."""
    return CONTENTS


@pytest.fixture
def zstore(tmp_path: Path) -> Store:
    return blob_store(tmp_path / "zstore", CONTENTS, zstd=True)


def nothing_left(cache_dir: Path) -> bool:
    blobs = [p for p in (cache_dir / "blobs").rglob("*") if p.is_file()]
    return not blobs and not os.listdir(cache_dir / "tmp")


async def test_fetch_into_cache(tmp_path: Path, store: Store, server: FaultServer) -> None:
    async with fetching([server.url], tmp_path / "cache") as (fetcher, cache):
        for chunk, content in zip(store.chunks, CONTENTS, strict=True):
            await fetcher.ensure(chunk)
            assert await cached(cache, chunk) == content
            assert server.count(chunk.hex) == 1
        await fetcher.ensure(store.chunks[0])  # cached: no request
        assert server.count(store.chunks[0].hex) == 1
        stats = fetcher.statistics()
        assert stats.blobs_fetched == len(CONTENTS)
        assert stats.bytes_fetched == sum(map(len, CONTENTS))
        assert stats.bytes_received_by_source == {server.url: sum(map(len, CONTENTS))}
        assert stats.errors == {}
        assert server.headers(store.chunks[0].hex)[0]["Accept-Encoding"] == "identity"
    assert os.listdir(tmp_path / "cache" / "tmp") == []


async def test_connections_are_kept_alive_and_bounded_by_the_slots(tmp_path: Path) -> None:
    root = tmp_path / "many"
    contents = [os.urandom(1000 + i) for i in range(40)]
    chunks = make_store(root, contents)
    config = replace(FAST, background_slots=3)
    with FaultServer(root) as many:
        async with fetching([many.url], tmp_path / "cache", config) as (fetcher, cache):
            async with trio.open_nursery() as nursery:
                for chunk in chunks[:30]:
                    nursery.start_soon(functools.partial(fetcher.ensure, chunk,
                                                         priority=Priority.PREFETCH))
            # ocix-store.json is asked once; then at most one connection per slot
            assert many.connections_accepted <= 1 + config.background_slots
            before = many.connections_accepted
            for chunk in chunks[30:]:  # one after another: a kept-alive connection each time
                await fetcher.ensure(chunk)
            assert many.connections_accepted == before
            assert [await cached(cache, chunk) for chunk in chunks] == contents


async def test_tampered_bytes_never_cached_and_next_mirror_used(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    bad, good = mirrors
    chunk = store.chunks[0]
    bad.fault(chunk.hex, Fault(tamper=True))
    async with fetching([bad.url, good.url], tmp_path / "cache") as (fetcher, cache):
        await fetcher.ensure(chunk)
        assert await cached(cache, chunk) == CONTENTS[0]
        assert (bad.count(chunk.hex), good.count(chunk.hex)) == (1, 1)
        assert fetcher.statistics().errors == {"corrupt": 1}


async def test_tampered_everywhere_is_blob_corrupt(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    chunk = store.chunks[0]
    for server in mirrors:
        server.fault(chunk.hex, Fault(tamper=True))
    cache_dir = tmp_path / "cache"
    async with fetching([s.url for s in mirrors], cache_dir) as (fetcher, _):
        with pytest.raises(BlobCorrupt, match=chunk.hex):
            await fetcher.ensure(chunk)
        # the second round asks caches on the way to fetch again
        retry_headers = mirrors[0].headers(chunk.hex)[1]
        assert retry_headers["Cache-Control"] == "no-cache"
        assert nothing_left(cache_dir)


FAILOVER_FAULTS = {
    "404": Fault(status=404),
    "500": Fault(status=500),
    "503": Fault(status=503),
    "reset-before-body": Fault(reset=0),
    "reset-mid-body": Fault(reset=10_000),
    "stall-before-headers": Fault(stall=30),
    "stall-mid-body": Fault(stall_body=30, stall_after=10_000),
    "truncated": Fault(truncate=10_000),
    "longer": Fault(extra=b"trailing garbage"),
}


@pytest.mark.parametrize("fault", FAILOVER_FAULTS.values(), ids=FAILOVER_FAULTS.keys())
async def test_failover(tmp_path: Path, store: Store, mirrors: Mirrors, fault: Fault) -> None:
    bad, good = mirrors
    chunk = store.chunks[0]
    bad.fault(chunk.hex, fault)
    async with fetching([bad.url, good.url], tmp_path / "cache") as (fetcher, cache):
        with trio.fail_after(20):
            await fetcher.ensure(chunk)
        assert await cached(cache, chunk) == CONTENTS[0]
        assert bad.count(chunk.hex) == 1
        assert good.count(chunk.hex) == 1
        assert sum(fetcher.statistics().errors.values()) == 1


async def test_dead_mirror_fails_over(tmp_path: Path, store: Store, mirrors: Mirrors) -> None:
    dead, good = mirrors
    dead.stop()  # its port now refuses connections
    async with fetching([dead.url, good.url], tmp_path / "cache") as (fetcher, _):
        await fetcher.ensure(store.chunks[1])
        assert fetcher.statistics().errors == {"connection": 1}


async def test_recently_failed_source_is_tried_last(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    sick, good = mirrors
    sick.fault("*", Fault(status=500))
    async with fetching([sick.url, good.url], tmp_path / "cache") as (fetcher, _):
        await fetcher.ensure(store.chunks[0])
        sick.clear()
        await fetcher.ensure(store.chunks[1])
        assert sick.count(store.chunks[1].hex) == 0
        assert good.count(store.chunks[1].hex) == 1


async def test_retry_after_is_waited_for_when_it_fits_the_deadline(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    chunk = store.chunks[0]
    server.fault(chunk.hex, Fault(status=503, retry_after="1"), times=1)
    async with fetching([server.url], tmp_path / "cache") as (fetcher, cache):
        started = trio.current_time()
        await fetcher.ensure(chunk)
        assert trio.current_time() - started >= 0.9  # not the 0.01 s backoff
        assert await cached(cache, chunk) == CONTENTS[0]
        assert server.count(chunk.hex) == 2


async def test_retry_after_beyond_the_deadline_fails_at_once(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    chunk = store.chunks[0]
    server.fault("*", Fault(status=429, retry_after="Wed, 21 Oct 2099 07:28:00 GMT"))
    async with fetching([server.url], tmp_path / "cache") as (fetcher, _):
        with trio.fail_after(FAST.deadline / 2), pytest.raises(FetchError, match="retry after"):
            await fetcher.ensure(chunk)
        assert server.count(chunk.hex) == 1  # asked once, not hammered


async def test_a_mirror_that_asked_for_time_is_left_alone(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    busy, good = mirrors
    busy.fault("*", Fault(status=503, retry_after="120"))
    async with fetching([busy.url, good.url], tmp_path / "cache") as (fetcher, _):
        await fetcher.ensure(store.chunks[0])
        busy.clear()
        await fetcher.ensure(store.chunks[1])
        assert busy.count(store.chunks[1].hex) == 0
        assert [good.count(chunk.hex) for chunk in store.chunks[:2]] == [1, 1]


async def test_missing_everywhere(tmp_path: Path, store: Store, mirrors: Mirrors) -> None:
    chunk = store.chunks[0]
    blob_path(store.root, chunk.hex).unlink()
    async with fetching([s.url for s in mirrors], tmp_path / "cache") as (fetcher, _):
        with pytest.raises(BlobNotFound):
            await fetcher.ensure(chunk)
        assert [s.count(chunk.hex) for s in mirrors] == [1, 1]  # no pointless second round


async def test_deadline_with_stalled_servers(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    for server in mirrors:
        server.fault("*", Fault(stall=60))
    config = replace(FAST, deadline=0.5, read_timeout=30)
    async with fetching([s.url for s in mirrors], tmp_path / "cache", config) as (fetcher, _):
        started = trio.current_time()
        with pytest.raises(FetchTimeout):
            await fetcher.ensure(store.chunks[0], deadline=trio.current_time() + 0.5)
        assert trio.current_time() - started < 10


async def test_flight_budget_bounds_a_drip(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """A body that trickles (never stalling long enough for the read timeout) still ends."""
    config = replace(FAST, deadline=0.5, min_rate=1e9, rate_window=0.2, read_timeout=30)
    server.fault("*", Fault(rate=2_000))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, _):
        with trio.fail_after(10), pytest.raises(FetchError):
            await fetcher.ensure(store.chunks[0])  # no waiter deadline: the flight's own
        assert fetcher.statistics().errors.get("slow", 0) >= 1


async def test_recent_failure_fails_fast(tmp_path: Path, store: Store, server: FaultServer) -> None:
    chunk = store.chunks[0]
    server.fault(chunk.hex, Fault(status=500))
    async with fetching([server.url], tmp_path / "cache") as (fetcher, _):
        with pytest.raises(FetchError, match="HTTP 500"):
            await fetcher.ensure(chunk)
        requests = server.count(chunk.hex)
        server.clear()
        with pytest.raises(FetchError, match="HTTP 500"):
            await fetcher.ensure(chunk)  # the kernel's immediate retry
        assert server.count(chunk.hex) == requests
        assert fetcher.statistics().fast_failures == 1


async def test_failure_memory_expires(tmp_path: Path, store: Store, server: FaultServer) -> None:
    chunk = store.chunks[0]
    config = replace(FAST, failure_memory=0.2)
    server.fault(chunk.hex, Fault(status=404))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, cache):
        with pytest.raises(BlobNotFound):
            await fetcher.ensure(chunk)
        server.clear()
        await trio.sleep(0.3)
        await fetcher.ensure(chunk)
        assert await cached(cache, chunk) == CONTENTS[0]


async def test_concurrent_requests_share_one_transfer(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    chunk = store.chunks[3]
    server.fault(chunk.hex, Fault(stall=0.3))
    async with fetching([server.url], tmp_path / "cache") as (fetcher, cache):
        async with trio.open_nursery() as nursery:
            for priority in [Priority.ON_DEMAND] * 20 + [Priority.BACKGROUND] * 5:
                nursery.start_soon(functools.partial(fetcher.ensure, chunk, priority=priority))
        assert server.count(chunk.hex) == 1
        assert await cached(cache, chunk) == CONTENTS[3]


async def test_zstd_store(tmp_path: Path, zstore: Store, serve: FaultServers) -> None:
    big = zstore.chunks[3]
    blob_path(zstore.root, zstore.chunks[2].hex + ".zst").unlink()  # this one only plain
    server = serve(zstore.root)
    async with fetching([server.url], tmp_path / "cache") as (fetcher, cache):
        for chunk, content in zip(zstore.chunks, CONTENTS, strict=True):
            await fetcher.ensure(chunk)
            assert await cached(cache, chunk) == content
        assert server.count(big.hex + ".zst") == 1
        assert server.count(big.hex) == 0
        assert server.count(zstore.chunks[2].hex) == 1
        assert server.count("ocix-store.json") == 1
        assert fetcher.statistics().errors == {}  # a missing .zst is no failure


@pytest.mark.parametrize("payload", ["bomb", "garbage", "other-content"])
async def test_bad_zstd_is_corrupt(
    tmp_path: Path, zstore: Store, serve: FaultServers, payload: str
) -> None:
    chunk = zstore.chunks[2]
    data = {
        "bomb": zstandard.ZstdCompressor().compress(bytes(200 << 20)),
        "garbage": b"not zstd at all" * 100,
        "other-content": zstandard.ZstdCompressor().compress(os.urandom(chunk.size)),
    }[payload]
    blob_path(zstore.root, chunk.hex + ".zst").write_bytes(data)
    cache_dir = tmp_path / "cache"
    async with fetching([serve(zstore.root).url], cache_dir) as (fetcher, _):
        with trio.fail_after(20), pytest.raises(BlobCorrupt):
            await fetcher.ensure(chunk)
    assert nothing_left(cache_dir)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zstd"])
async def test_file_store(tmp_path: Path, compressed: bool) -> None:
    root = tmp_path / "store"
    chunks = make_store(root, CONTENTS, zstd=compressed)
    for form in (root.as_uri(), str(root)):
        cache_dir = tmp_path / f"cache-{len(form)}"
        async with fetching([form], cache_dir) as (fetcher, cache):
            for chunk, content in zip(chunks, CONTENTS, strict=True):
                await fetcher.ensure(chunk)
                assert await cached(cache, chunk) == content
            assert fetcher.statistics().blobs_by_source == {f"file://{root}": len(CONTENTS)}


async def test_file_store_missing_and_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "store"
    chunks = make_store(root, CONTENTS[:2])
    blob_path(root, chunks[0].hex).unlink()
    blob_path(root, chunks[1].hex).write_bytes(b"?")
    async with fetching([root.as_uri()], tmp_path / "cache") as (fetcher, _):
        with pytest.raises(BlobNotFound):
            await fetcher.ensure(chunks[0])
        with pytest.raises(BlobCorrupt):
            await fetcher.ensure(chunks[1])


async def test_on_demand_never_waits_behind_background(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    slow = store.chunks[:3]
    urgent = store.chunks[3]
    config = replace(FAST, background_slots=1, on_demand_slots=1, read_timeout=30)
    for chunk in slow:
        server.fault(chunk.hex, Fault(stall=30))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, cache):
        for chunk in slow:
            assert fetcher.start(chunk, Priority.PREFETCH)
        await fetcher.ensure(urgent, deadline=trio.current_time() + 10)
        assert await cached(cache, urgent) == CONTENTS[3]
        stats = fetcher.statistics()
        assert stats.in_flight == 3
        assert stats.queued == 2  # one background slot, busy with the stalled blob


async def test_queued_background_fetch_is_promoted(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    blocker, wanted = store.chunks[0], store.chunks[1]
    config = replace(FAST, background_slots=1, read_timeout=30)
    server.fault(blocker.hex, Fault(stall=30))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, cache):
        fetcher.start(blocker, Priority.BACKGROUND)
        fetcher.start(wanted, Priority.BACKGROUND)  # queued behind the blocker
        await trio.testing.wait_all_tasks_blocked()
        assert server.count(wanted.hex) == 0
        await fetcher.ensure(wanted, deadline=trio.current_time() + 10)
        assert await cached(cache, wanted) == CONTENTS[1]
        assert server.count(wanted.hex) == 1


async def test_background_order_follows_priority(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    config = replace(FAST, background_slots=1)
    order: list[str] = []
    server.fault(store.chunks[0].hex, Fault(stall=0.2))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, _):

        async def want(chunk: Chunk, priority: Priority) -> None:
            await fetcher.ensure(chunk, priority=priority)
            order.append(chunk.hex)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(want, store.chunks[0], Priority.BACKGROUND)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(want, store.chunks[1], Priority.BACKGROUND)
            nursery.start_soon(want, store.chunks[2], Priority.PREFETCH)
            nursery.start_soon(want, store.chunks[3], Priority.READAHEAD)
    expected = [store.chunks[i].hex for i in (0, 3, 2, 1)]
    assert order == expected


def test_faultserver_serves_ranges(store: Store, server: FaultServer) -> None:
    chunk = store.chunks[0]
    url = f"{server.url}/blobs/blake3/{chunk.hex}"
    request = urllib.request.Request(url, headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{chunk.size}"
        assert response.read() == CONTENTS[0][10:20]
    assert server.count(chunk.hex) == 1


async def test_a_blob_larger_than_the_quota_is_refused_before_any_request(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """A 3 MB blob and a 1 MB quota: no byte is downloaded; the failure is remembered (the
    kernel's retry fails at once); blobs that fit are fetched as usual."""
    big, small = store.chunks[3], store.chunks[0]
    small_quota = CacheConfig(quota=CacheQuota(size=1_000_000))
    async with fetching([server.url], tmp_path / "cache", cache_config=small_quota) as (
        fetcher, cache
    ):
        for _ in range(2):
            with pytest.raises(CacheFullError, match="larger than the cache quota"):
                await fetcher.ensure(big)
        assert server.count(big.hex) == 0
        assert fetcher.statistics().fast_failures == 1
        await fetcher.ensure(small)
        assert await cached(cache, small) == CONTENTS[0]
    assert os.listdir(tmp_path / "cache" / "tmp") == []


# --- one transfer per blob on the host: processes sharing a cache claim each fetch ---


async def test_two_processes_fetching_one_blob_share_one_transfer(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """Two fetchers over one cache directory (two processes' worth of open files: a flock
    conflicts between them as between processes) ask for the same slow blob at once: the
    server sends it once, and the fetcher that waited says another process fetched it."""
    chunk = store.chunks[0]
    server.fault(chunk.hex, Fault(stall=0.3))
    cache_dir = tmp_path / "cache"
    async with (
        fetching([server.url], cache_dir) as (first, _),
        fetching([server.url], cache_dir) as (second, second_cache),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(first.ensure, chunk)
        await trio.sleep(0.05)  # the first holds the claim and waits on the stalled server
        nursery.start_soon(second.ensure, chunk)
    assert server.count(chunk.hex) == 1
    assert await cached(second_cache, chunk) == CONTENTS[0]
    stats = first.statistics(), second.statistics()
    assert [s.blobs_fetched for s in stats] == [1, 0]
    assert [s.fetched_by_others for s in stats] == [0, 1]
    assert os.listdir(cache_dir / "tmp") == []  # the claim file goes with its claim


async def test_a_claim_given_up_without_the_blob_is_taken_over(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """The process holding a claim gives it up without delivering (its fetch failed): the
    one waiting claims the blob and fetches it itself."""
    chunk = store.chunks[2]
    cache_dir = tmp_path / "cache"
    async with fetching([server.url], cache_dir) as (fetcher, cache):
        with Cache(cache_dir) as other_process:
            claim = other_process.claim_fetch(chunk)
            assert claim is not None
            assert cache.claim_fetch(chunk) is None  # held elsewhere
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.ensure, chunk)
                await trio.sleep(0.2)
                assert server.count(chunk.hex) == 0  # waiting, not fetching
                claim.release()
        assert await cached(cache, chunk) == CONTENTS[2]
        assert server.count(chunk.hex) == 1
        assert fetcher.statistics().fetched_by_others == 0


async def test_a_claim_held_too_long_does_not_stop_the_fetch(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """A claim held past the fetch's whole budget (a holder that hangs) is ignored: the
    blob is fetched anyway and the read is served."""
    chunk = store.chunks[1]
    quick = replace(FAST, deadline=0.3)
    cache_dir = tmp_path / "cache"
    async with fetching([server.url], cache_dir, quick) as (fetcher, cache):
        with Cache(cache_dir) as other_process:
            claim = other_process.claim_fetch(chunk)
            assert claim is not None
            await fetcher.ensure(chunk, deadline=trio.current_time() + 5)
            claim.release()
        assert await cached(cache, chunk) == CONTENTS[1]
        assert server.count(chunk.hex) == 1


async def test_a_prefetch_waits_while_another_process_reads_on_demand(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """Host-wide priorities: one fetcher's prefetch does not start while another process
    sharing the cache fetches for a waiting read, and starts once that read is served."""
    read, prefetched = store.chunks[0], store.chunks[2]
    server.fault(read.hex, Fault(stall=0.4))
    cache_dir = tmp_path / "cache"
    async with (
        fetching([server.url], cache_dir) as (reading, _),
        fetching([server.url], cache_dir) as (prefetching, cache),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(reading.ensure, read)
        await trio.sleep(0.1)  # the read is on the wire
        assert prefetching.start(prefetched, Priority.PREFETCH)
        await trio.sleep(0.2)
        assert server.count(prefetched.hex) == 0  # held back by the other process's read
        await prefetching.ensure(prefetched, priority=Priority.PREFETCH,
                                 deadline=trio.current_time() + 5)
        assert server.count(read.hex) == 1
        assert await cached(cache, prefetched) == CONTENTS[2]


async def test_a_held_back_prefetch_never_holds_the_blob_a_read_waits_for(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    """One process's prefetch of a blob is held back (another process reads on demand);
    a read of the same blob in a third process is served at once: the prefetch claims
    nothing before it holds a slot."""
    chunk = store.chunks[2]
    cache_dir = tmp_path / "cache"
    async with (
        fetching([server.url], cache_dir) as (prefetching, _),
        fetching([server.url], cache_dir) as (reading, cache),
    ):
        someone_reading = HostDemand(cache_dir / "demand.lock")
        someone_reading.set_busy(True)
        try:
            assert prefetching.start(chunk, Priority.PREFETCH)
            await trio.sleep(0.1)
            assert server.count(chunk.hex) == 0  # held back
            with trio.fail_after(3):
                await reading.ensure(chunk, deadline=trio.current_time() + 3)
        finally:
            someone_reading.close()
        assert await cached(cache, chunk) == CONTENTS[2]
        assert server.count(chunk.hex) == 1
