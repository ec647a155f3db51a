"""Site caches in front of the store (README "Serving many hosts").

The proxy group (``FetchConfig.proxies``, ``--proxy``): routes in order, a failed proxy
skipped for ``proxy_down`` seconds, the next route tried within the same attempt, DIRECT as
the last resort, NO_PROXY honoured, manifests downloaded by the same rules. Then real
servers from Debian packages: several mounts with separate caches start the same image at
once through Squid (``--proxy``) or an nginx ``proxy_cache`` mirror (``--store``); the origin
sends one client's bytes, and killing the cache mid-run costs no read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ocixfs.config import FetchConfig
from ocixfs.errors import FetchError, UsageError
from ocixfs.http import DIRECT, PROXIES, download, proxy_group
from tests.faultserver import Fault, FaultServer
from tests.forwardproxy import ForwardProxy
from tests.mounting import Mounts, is_mounted, needs_fuse, run_ocixfs, wait_for
from tests.reliabilitykit import Image, write_image
from tests.servers import FaultServers, Store, cached, fetching_with
from tests.sitecaches import NginxCache, Origin, Squid

FAST = FetchConfig(deadline=10.0, connect_timeout=2.0, read_timeout=3.0, backoff=0.05,
                   failure_memory=0.5, proxy_down=60.0)
fetching = fetching_with(FAST)
CONTENTS = [bytes([n]) * (50_000 + n) for n in range(4)]


@pytest.fixture
def blob_contents() -> list[bytes]:
    return CONTENTS


def dead_url(serve: FaultServers, root: Path) -> str:
    """A proxy URL nobody listens on (a server started and stopped: connection refused)."""
    server = serve(root)
    server.stop()
    return server.url


def via_proxy(server: FaultServer, hexdigest: str) -> list[bool]:
    """For each request of the blob the origin saw: did it come through a proxy?"""
    return ["Via" in headers for headers in server.headers(hexdigest)]


# --- the group -----------------------------------------------------------------------------


def test_proxy_options_are_checked() -> None:
    assert proxy_group(["http://cache-a:3128/", "direct"]) == ("http://cache-a:3128", DIRECT)
    for bad, message in [("ftp://x:21", "expected"), ("http://h/path", "expected"),
                         ("http://h:99999", "expected"), ("http://u:pw@h:1", "credentials"),
                         ("cache-a:3128", "expected")]:
        with pytest.raises(UsageError, match=message):
            proxy_group([bad])
    with pytest.raises(UsageError, match="twice"):
        proxy_group(["DIRECT", "DIRECT"])


@pytest.mark.parametrize("option", [["--proxy", "squid.site:3128"],
                                    ["-o", "proxy=http://u:secret@squid.site:3128"],
                                    ["--proxy", "DIRECT", "-o", "proxy=direct"]])
def test_a_bad_proxy_option_is_a_one_line_usage_error(tmp_path: Path, option: list[str]) -> None:
    image = write_image(tmp_path / "image", {"/f": b"f"})
    (tmp_path / "mnt").mkdir()
    result = run_ocixfs("mount", os.fspath(image.ocix), os.fspath(tmp_path / "mnt"),
                        "--store", os.fspath(image.store), *option, check=False, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("ocixfs: --proxy ") and result.stderr.count("\n") == 1
    assert "secret" not in result.stderr
    assert not is_mounted(tmp_path / "mnt")


async def test_a_dead_proxy_is_skipped_within_the_attempt_and_then_tried_last(
    tmp_path: Path, store: Store, server: FaultServer, serve: FaultServers,
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    dead = dead_url(serve, tmp_path)
    with ForwardProxy() as second:
        config = replace(FAST, proxies=(dead, second.url, DIRECT), rounds=1)
        async with fetching([server.url], tmp_path / "c", config=config) as (fetcher, cache):
            await fetcher.ensure(store.chunks[0])
            assert await cached(cache, store.chunks[0]) == CONTENTS[0]
            assert PROXIES.routes(config, server.url) == [second.url, DIRECT, dead]
            await fetcher.ensure(store.chunks[1])
        assert [url.rsplit("/", 1)[-1] for url in second.requests if "/blobs/" in url] == [
            store.chunks[0].hex, store.chunks[1].hex]
    assert via_proxy(server, store.chunks[0].hex) == [True]


async def test_direct_is_the_last_resort_and_a_proxy_that_works_again_is_first(
    tmp_path: Path, store: Store, server: FaultServer, serve: FaultServers,
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    proxy = serve(tmp_path / "nothing")  # a FaultServer answers absolute URLs like a proxy
    proxy.stop()
    config = replace(FAST, proxies=(proxy.url, DIRECT), proxy_down=0.0, rounds=1)
    async with fetching([server.url], tmp_path / "c", config=config) as (fetcher, _):
        await fetcher.ensure(store.chunks[0])
        assert via_proxy(server, store.chunks[0].hex) == [False]
        proxy.root = store.root
        proxy.start()  # back (proxy_down 0: asked first again at once)
        await fetcher.ensure(store.chunks[1])
    assert proxy.count(store.chunks[1].hex) == 1
    assert server.count(store.chunks[1].hex) == 0


async def test_a_proxy_dying_mid_body_is_marked_down_and_the_blob_comes_direct(
    tmp_path: Path, store: Store, server: FaultServer, serve: FaultServers,
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    proxy = serve(store.root)  # serves the store to absolute URLs: a caching proxy's answer
    proxy.fault("*", Fault(reset=10_000))
    config = replace(FAST, proxies=(proxy.url, DIRECT))
    async with fetching([server.url], tmp_path / "c", config=config) as (fetcher, cache):
        await fetcher.ensure(store.chunks[2])
        assert await cached(cache, store.chunks[2]) == CONTENTS[2]
        assert PROXIES.routes(config, server.url) == [DIRECT, proxy.url]
        await fetcher.ensure(store.chunks[3])
    assert proxy.count(store.chunks[2].hex) == 1
    assert proxy.count(store.chunks[3].hex) == 0  # down: not asked again
    assert via_proxy(server, store.chunks[2].hex) == [False]


async def test_no_proxy_applies_to_the_group(
    tmp_path: Path, store: Store, server: FaultServer, no_proxy_env: pytest.MonkeyPatch,
) -> None:
    with ForwardProxy() as proxy:
        no_proxy_env.setenv("NO_PROXY", "example.org,127.0.0.1")
        config = replace(FAST, proxies=(proxy.url,))
        assert PROXIES.routes(config, "http://mirror.example.org/store") == [DIRECT]
        assert PROXIES.routes(config, "http://example.com/store") == [proxy.url]
        async with fetching([server.url], tmp_path / "c", config=config) as (fetcher, _):
            await fetcher.ensure(store.chunks[0])
        assert proxy.requests == []
        no_proxy_env.setenv("NO_PROXY", "127.0.0.1:1")  # another port: not bypassed
        assert PROXIES.routes(config, server.url) == [proxy.url]


def test_a_manifest_download_follows_the_group(
    tmp_path: Path, store: Store, server: FaultServer, serve: FaultServers,
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    dead = dead_url(serve, tmp_path)
    no_proxy_env.setenv("HTTP_PROXY", dead)  # ignored: the group decides
    url = f"{server.url}/blobs/blake3/{store.chunks[1].hex}"
    with ForwardProxy() as proxy:
        config = replace(FAST, proxies=(dead, proxy.url))
        assert download(url, max_bytes=1 << 20, config=config) == CONTENTS[1]
        assert proxy.requests == [url]


def test_an_origin_that_refuses_puts_no_route_down_and_a_probe_judges_none(
    tmp_path: Path, serve: FaultServers, no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """DIRECT failing is one origin's failure (the mirror failover's business), not a route
    every store shares; and the store probe's short look never marks a proxy down."""
    from ocixfs.store.remote import probe
    from ocixfs.store.spec import parse_store

    origin, dead = dead_url(serve, tmp_path / "o"), dead_url(serve, tmp_path / "p")
    config = replace(FAST, proxies=(DIRECT, dead))
    with pytest.raises(FetchError, match="Connection refused"):
        download(f"{origin}/image.ocix", max_bytes=1 << 20, config=config)
    assert PROXIES.routes(config, origin) == [DIRECT, dead]  # the dead proxy is down...
    other = replace(FAST, proxies=(dead, DIRECT))
    assert PROXIES.routes(other, origin) == [DIRECT, dead]  # ...DIRECT is not
    fresh = dead_url(serve, tmp_path / "q")
    probed = replace(FAST, proxies=(fresh, DIRECT))
    assert probe(parse_store(origin + "/"), probed, timeout=1.0) is not None
    assert PROXIES.routes(probed, origin) == [fresh, DIRECT]  # the probe judged no route


# --- real site caches --------------------------------------------------------------------

CLIENTS = 4
FILES = 24
FILE_SIZE = 256 * 1024


def fleet_image(directory: Path, seed: int) -> Image:
    files = {f"/data/f{n:02d}.bin": os.urandom(FILE_SIZE - n) for n in range(FILES)}
    files["/etc/seed"] = str(seed).encode()
    return write_image(directory, files)


def start_together(image: Image, mountpoints: list[Path]) -> Callable[[], list[str]]:
    """Every client reads every file of ``image`` in the same order, all starting at once
    (threads behind a barrier); returns ``join()``, giving each wrong or failed read."""
    barrier = threading.Barrier(len(mountpoints))
    problems: list[str] = []

    def client(mountpoint: Path) -> None:
        barrier.wait()
        for path, content in sorted(image.contents.items()):
            try:
                if (mountpoint / path.lstrip("/")).read_bytes() != content:
                    problems.append(f"{mountpoint}{path}: wrong bytes")
            except OSError as exc:
                problems.append(f"{mountpoint}{path}: {exc}")

    threads = [threading.Thread(target=client, args=(m,)) for m in mountpoints]
    for thread in threads:
        thread.start()

    def join() -> list[str]:
        for thread in threads:
            thread.join(timeout=300)
        return problems + [f"{thread.name}: still reading" for thread in threads
                           if thread.is_alive()]

    return join


@pytest.fixture
def fleet(tmp_path: Path, mounts: Mounts) -> Iterator[Callable[..., list[Path]]]:
    """``fleet(image_source, name, *args)``: CLIENTS mounts, each with its own cache."""

    def start(source: str, name: str, *args: str) -> list[Path]:
        points = []
        for number in range(CLIENTS):
            mount = mounts(source, tmp_path / f"{name}-mnt{number}",
                           *args, "--cache-dir", os.fspath(tmp_path / f"{name}-cache{number}"),
                           "--prefetch", "none", "--deadline", "30")
            mount.start()
            points.append(mount.mountpoint)
        return points

    yield start


def one_clients_bytes(image: Image) -> int:
    return sum(len(content) for content in image.contents.values())


def check_sharing(origin: Origin, image: Image, name: str) -> None:
    requests, sent = origin.sent(f"/{name}/store/blobs/")
    blobs = sum(len(chunks) for chunks in image.blobs.values())
    assert sent <= 1.2 * one_clients_bytes(image), (sent, one_clients_bytes(image))
    assert blobs <= requests <= 1.2 * blobs


def kill_mid_run(origin: Origin, name: str, kill: Callable[[], None]) -> None:
    """Kill the cache once the origin has sent a few of the image's blobs (not all)."""
    wait_for(lambda: origin.sent(f"/{name}/store/blobs/")[0] >= 3, timeout=60,
             what="the first blobs to reach the cache")
    kill()


def origin_tree(tmp_path: Path) -> tuple[Path, Image, Image]:
    """Two images under one origin root: ``shared/`` (all clients through a live cache)
    and ``killed/`` (the cache dies while they read)."""
    root = tmp_path / "origin"
    return root, fleet_image(root / "shared", 1), fleet_image(root / "killed", 2)


@needs_fuse
@pytest.mark.mount
def test_squid_serves_a_fleet_and_its_death_costs_no_read(
    tmp_path: Path, fleet: Callable[..., list[Path]], no_proxy_env: pytest.MonkeyPatch,
) -> None:
    root, shared, killed = origin_tree(tmp_path)
    with Origin(root, tmp_path / "origin-work", rate="1m") as origin, Squid() as squid:
        proxies = ("--proxy", squid.url, "-o", "proxy=DIRECT")  # options, then -o values
        clients = fleet(f"{origin.url}shared/image.ocix", "shared", *proxies,
                        "--store", f"{origin.url}shared/store/")
        assert start_together(shared, clients)() == []
        check_sharing(origin, shared, "shared")
        assert origin.sent("/shared/", via=False) == (0, 0)  # manifests came through squid too
        assert any(result.startswith("TCP_HIT") or result.startswith("TCP_MEM_HIT")
                   for result in squid.results())

        clients = fleet(f"{origin.url}killed/image.ocix", "killed", *proxies,
                        "--store", f"{origin.url}killed/store/")
        join = start_together(killed, clients)
        kill_mid_run(origin, "killed", squid.kill)
        assert join() == []
        assert origin.sent("/killed/store/blobs/", via=False)[0] > 0  # the rest came direct


@needs_fuse
@pytest.mark.mount
def test_nginx_cache_serves_a_fleet_and_its_death_costs_no_read(
    tmp_path: Path, fleet: Callable[..., list[Path]], no_proxy_env: pytest.MonkeyPatch,
) -> None:
    root, shared, killed = origin_tree(tmp_path)
    with (Origin(root, tmp_path / "origin-work", rate="1m") as origin,
          NginxCache(origin.url, tmp_path / "cache-work") as cache):
        for name, image in [("shared", shared), ("killed", killed)]:
            mirrors = ("--store", f"{cache.url}{name}/store/",
                       "--store", f"{origin.url}{name}/store/")
            clients = fleet(os.fspath(image.ocix), name, *mirrors)
            join = start_together(image, clients)
            if name == "killed":
                kill_mid_run(origin, name, cache.kill)
            assert join() == []
            if name == "shared":
                check_sharing(origin, image, name)
