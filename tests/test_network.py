"""Network behaviour of the data path (issue 5, item 2), against real local servers.

Fetcher-level tests use ``tests/faultserver.py`` servers (plain and TLS), a forwarding
proxy and a black-hole address; the real-mount tests at the end run ``ocixfs mount``.
Failover over each kind of broken response is in ``test_fetcher.py::test_failover``.
"""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import zstandard

from ocixfs.config import FetchConfig
from ocixfs.errors import BlobNotFound, FetchError, FormatError, UsageError
from ocixfs.http import download, freshness_lifetime, load_credentials, redact, ssl_context
from ocixfs.mount.profile import profile_beside
from tests.faultserver import Fault, FaultServer, make_store
from tests.forwardproxy import ForwardProxy
from tests.mounting import Mount, is_mounted, needs_fuse, run_ocixfs, wait_for
from tests.reliabilitykit import Image, black_hole, mount_args, read_or_errno, write_image
from tests.servers import FaultServers, Mirrors, Store, cached, fetching_with
from tests.tlscerts import Certs, make_ca, needs_openssl, server_context

FAST = FetchConfig(
    deadline=5.0, connect_timeout=1.0, read_timeout=1.0, backoff=0.01, threads=4
)
CONTENTS = [os.urandom(n) for n in (70_000, 1, 5_000)]
TOKEN = "tok-7f3a9c-SECRET"
PASSWORD = "pw-41b2-SECRET"
fetching = fetching_with(FAST)  # test_hostile.py borrows it


@pytest.fixture
def blob_contents() -> list[bytes]:
    """What the ``store`` fixture (and ``server``, ``mirrors``) of tests/conftest.py hold."""
    return CONTENTS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    return make_ca(tmp_path_factory.mktemp("ca"))


# --- timeouts, minimum rate, retries, failover -------------------------------------------


async def test_connect_timeout_fails_over_to_the_next_mirror(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    chunks = store.chunks
    config = replace(FAST, connect_timeout=0.3)
    with black_hole() as dead:
        async with fetching([dead, server.url], tmp_path / "cache", config) as (fetcher, cache):
            with trio.fail_after(20):
                await fetcher.ensure(chunks[0])
            assert await cached(cache, chunks[0]) == CONTENTS[0]
            assert fetcher.statistics().errors == {"timeout": 1}


async def test_transfer_below_the_minimum_rate_fails_over(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    chunks = store.chunks
    config = replace(FAST, min_rate=200_000, rate_window=0.3, read_timeout=30)
    slow, good = mirrors
    slow.fault("*", Fault(rate=10_000))  # 70 kB at 10 kB/s: alive, but far too slow
    async with fetching([slow.url, good.url], tmp_path / "cache", config) as (fetcher, cache):
        with trio.fail_after(20):
            await fetcher.ensure(chunks[0])
        assert await cached(cache, chunks[0]) == CONTENTS[0]
        assert fetcher.statistics().errors == {"slow": 1}
        assert good.count(chunks[0].hex) == 1


async def test_a_store_dripping_its_configuration_falls_back_to_plain_names_and_mirrors(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Two zstd stores; the first sends ``ocix-store.json`` (and everything else) one byte
    per (virtual) second, forever alive. With the default settings (a 30 s deadline, 32 KiB/s
    after 10 s), reads are served within their deadline: discovery gives up at the
    minimum-rate rule and plain names are used; the first blob comes from the second
    mirror, then the first store's discovery is not asked again for a while."""
    mock_clock.rate = 20  # 1 real second is 20 virtual ones; the server drips in real time
    contents = [os.urandom(40_000), os.urandom(30_000)]
    dripping = make_store(tmp_path / "a", contents, zstd=True)
    make_store(tmp_path / "b", contents, zstd=True)
    config = FetchConfig(threads=4)
    with FaultServer(tmp_path / "a") as drip, FaultServer(tmp_path / "b") as good:
        drip.fault("*", Fault(rate=20))  # a byte every 50 ms real: 1 B/s virtual
        async with fetching([drip.url, good.url], tmp_path / "cache", config) as (fetcher, cache):
            for chunk, content in zip(dripping, contents, strict=True):
                started = trio.current_time()
                await fetcher.ensure(chunk, deadline=started + config.deadline)
                assert trio.current_time() - started < config.deadline
                assert await cached(cache, chunk) == content
            assert drip.count("ocix-store.json") == 1
            assert good.count("ocix-store.json") == 1
            assert good.count(dripping[0].hex + ".zst") == 1


async def test_retries_are_bounded_and_spaced(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    chunks = store.chunks
    config = replace(FAST, rounds=3, backoff=0.2)
    server.fault("*", Fault(status=503))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, _):
        started = trio.current_time()
        with pytest.raises(FetchError, match="HTTP 503"):
            await fetcher.ensure(chunks[0])
        # two jittered pauses of at least half of 0.2 s and 0.4 s
        assert trio.current_time() - started >= 0.3
        assert server.count(chunks[0].hex) == 3


async def test_a_transient_failure_is_retried(
    tmp_path: Path, store: Store, server: FaultServer
) -> None:
    chunks = store.chunks
    server.fault(chunks[0].hex, Fault(reset=0), times=1)
    async with fetching([server.url], tmp_path / "cache") as (fetcher, cache):
        await fetcher.ensure(chunks[0])
        assert await cached(cache, chunks[0]) == CONTENTS[0]
        assert server.count(chunks[0].hex) == 2


async def test_failover_returns_to_the_first_mirror_after_a_while(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    chunks = store.chunks
    config = replace(FAST, source_penalty=0.5)
    first, second = mirrors
    first.fault(chunks[0].hex, Fault(status=500))
    async with fetching([first.url, second.url], tmp_path / "cache", config) as (fetcher, _):
        await fetcher.ensure(chunks[0])
        assert (first.count(chunks[0].hex), second.count(chunks[0].hex)) == (1, 1)
        first.clear()
        await fetcher.ensure(chunks[1])  # the first mirror is still being avoided
        assert (first.count(chunks[1].hex), second.count(chunks[1].hex)) == (0, 1)
        await trio.sleep(0.6)  # let the penalty expire (setup, not an assertion)
        await fetcher.ensure(chunks[2])
        assert (first.count(chunks[2].hex), second.count(chunks[2].hex)) == (1, 0)


# --- redirects ---------------------------------------------------------------------------


async def test_redirect_to_another_host_is_followed_without_credentials(
    tmp_path: Path, store: Store, server: FaultServer, serve: FaultServers
) -> None:
    root, chunks = store
    origin, cdn = server, serve(root, host="127.0.0.2")
    auth_file = tmp_path / "auth"
    auth_file.write_text(f"{origin.url}/ bearer {TOKEN}\n")
    origin.auth = f"Bearer {TOKEN}"
    origin.fault("*", Fault(redirect=cdn.url))
    config = replace(FAST, auth_file=os.fspath(auth_file))
    async with fetching([origin.url], tmp_path / "cache", config) as (fetcher, cache):
        await fetcher.ensure(chunks[0])
        assert await cached(cache, chunks[0]) == CONTENTS[0]
    assert cdn.count(chunks[0].hex) == 1
    assert origin.headers(chunks[0].hex)[0]["Authorization"] == f"Bearer {TOKEN}"
    assert all("Authorization" not in headers for headers in cdn.headers())


async def test_redirect_loop_fails_over(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    chunks = store.chunks
    looping, good = mirrors
    looping.fault("*", Fault(redirect=looping.url))
    async with fetching([looping.url, good.url], tmp_path / "cache") as (fetcher, cache):
        await fetcher.ensure(chunks[0])
        assert await cached(cache, chunks[0]) == CONTENTS[0]
        assert fetcher.statistics().errors == {"connection": 1}
    assert looping.count(chunks[0].hex) == FAST.max_redirects + 1


@needs_openssl
async def test_redirect_from_https_to_http_is_refused(
    tmp_path: Path, store: Store, certs: Certs, serve: FaultServers
) -> None:
    root, chunks = store
    config = replace(FAST, ca_file=os.fspath(certs.ca))
    secure = serve(root, tls=server_context(certs))
    plain = serve(root, host="127.0.0.2")
    secure.fault("*", Fault(redirect=plain.url))
    async with fetching([secure.url], tmp_path / "cache", config) as (fetcher, _):
        with pytest.raises(FetchError, match="refused redirect from https"):
            await fetcher.ensure(chunks[0])
    assert plain.count() == 0


# --- TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "seconds"), [
    ({}, 0.0),
    ({"cache-control": "max-age=60"}, 60.0),
    ({"cache-control": "public, MAX-AGE=\"120\""}, 120.0),
    ({"cache-control": "max-age=60", "age": "45"}, 15.0),
    ({"cache-control": "max-age=60", "age": "90"}, 0.0),
    ({"cache-control": "max-age=60, no-cache"}, 0.0),
    ({"cache-control": "no-store, max-age=60"}, 0.0),
    ({"cache-control": "max-age=-5"}, 0.0),
    ({"cache-control": "max-age=soon"}, 0.0),
    ({"cache-control": "max-age=99999999999"}, 365 * 86400.0),
    ({"expires": "Sat, 05 Dec 2026 12:10:00 GMT", "date": "Sat, 05 Dec 2026 12:00:00 GMT"}, 600.0),
    ({"expires": "0", "date": "Sat, 05 Dec 2026 12:00:00 GMT"}, 0.0),
    ({"expires": "Sat, 05 Dec 2026 12:10:00 GMT"}, 0.0),  # no Date: no basis
    ({"cache-control": "max-age=5", "expires": "Sat, 05 Dec 2026 12:10:00 GMT",
      "date": "Sat, 05 Dec 2026 12:00:00 GMT"}, 5.0),
])
def test_freshness_follows_rfc_9111_without_heuristics(
    headers: dict[str, str], seconds: float
) -> None:
    assert freshness_lifetime(headers) == seconds


def test_tls_trusts_the_system_store() -> None:
    """The same CAs as OpenSSL's defaults (what the distribution manages), not a bundle."""
    ours, system = ssl_context(), ssl.create_default_context()
    assert ours.verify_mode == ssl.CERT_REQUIRED and ours.check_hostname
    assert ours.get_ca_certs() == system.get_ca_certs()
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
        assert ours.get_ca_certs()


def test_the_store_the_environment_names_is_part_of_the_context_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SSL_CERT_FILE``/``SSL_CERT_DIR`` naming the default store's files (as many
    environments do) share the context made without them (the host service's); naming
    another store makes another context, which trusts that store."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    default = ssl_context()
    paths = ssl.get_default_verify_paths()
    if paths.cafile is None or paths.capath is None:
        pytest.skip("no default CA store on this host")
    monkeypatch.setenv("SSL_CERT_FILE", os.path.realpath(paths.cafile))
    monkeypatch.setenv("SSL_CERT_DIR", os.path.realpath(paths.capath))
    assert ssl_context() is default
    monkeypatch.setenv("SSL_CERT_FILE", os.fspath(tmp_path / "none.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", os.fspath(tmp_path))
    other = ssl_context()
    assert other is not default and other.get_ca_certs() == []


@needs_openssl
async def test_tls_with_an_unknown_ca_is_refused(
    tmp_path: Path, store: Store, certs: Certs, serve: FaultServers
) -> None:
    root, chunks = store
    server = serve(root, tls=server_context(certs))
    async with fetching([server.url], tmp_path / "cache") as (fetcher, _):
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetcher.ensure(chunks[0])
    assert server.count() == 0  # no request was sent over the untrusted connection


@needs_openssl
@pytest.mark.parametrize("how", ["ca_file", "SSL_CERT_FILE"])
async def test_tls_with_a_private_ca(
    tmp_path: Path,
    store: Store,
    certs: Certs,
    serve: FaultServers,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    root, chunks = store
    config = FAST
    if how == "ca_file":
        config = replace(FAST, ca_file=os.fspath(certs.ca))
    else:
        monkeypatch.setenv("SSL_CERT_FILE", os.fspath(certs.ca))
    server = serve(root, tls=server_context(certs))
    async with fetching([server.url], tmp_path / "cache", config) as (fetcher, cache):
        await fetcher.ensure(chunks[0])
        assert await cached(cache, chunks[0]) == CONTENTS[0]


def test_bad_ca_file_is_a_one_line_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such CA file"):
        ssl_context(os.fspath(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(UsageError, match="not a readable PEM"):
        ssl_context(os.fspath(tmp_path / "junk.pem"))


# --- proxies -----------------------------------------------------------------------------


async def test_http_proxy_from_the_environment(
    tmp_path: Path, store: Store, server: FaultServer, no_proxy_env: pytest.MonkeyPatch
) -> None:
    chunks, origin = store.chunks, server
    with ForwardProxy() as proxy:
        no_proxy_env.setenv("HTTP_PROXY", proxy.url)
        async with fetching([origin.url], tmp_path / "c1") as (fetcher, cache):
            await fetcher.ensure(chunks[0])
            assert await cached(cache, chunks[0]) == CONTENTS[0]
        assert f"{origin.url}/blobs/blake3/{chunks[0].hex}" in proxy.requests
        assert origin.headers(chunks[0].hex)[0]["Via"] == "1.1 ocixfs-test-proxy"
        no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
        asked = len(proxy.requests)
        async with fetching([origin.url], tmp_path / "c2") as (fetcher, _):
            await fetcher.ensure(chunks[1])
        assert len(proxy.requests) == asked
        assert "Via" not in origin.headers(chunks[1].hex)[0]


# --- credentials -------------------------------------------------------------------------


async def test_bearer_token_from_the_auth_file(
    tmp_path: Path, store: Store, mirrors: Mirrors
) -> None:
    chunks = store.chunks
    server, other = mirrors
    server.auth = f"Bearer {TOKEN}"
    auth_file = tmp_path / "auth"
    auth_file.write_text(f"# store credentials\n\n{server.url}/ bearer {TOKEN}\n")
    auth_file.chmod(0o600)
    async with fetching([server.url], tmp_path / "c0") as (fetcher, _):
        with pytest.raises(FetchError, match="HTTP 401"):
            await fetcher.ensure(chunks[0])
    config = replace(FAST, auth_file=os.fspath(auth_file))
    async with fetching([other.url, server.url], tmp_path / "c1", config) as (fetcher, _):
        other.fault(chunks[0].hex, Fault(status=404))
        await fetcher.ensure(chunks[0])
    assert other.headers(chunks[0].hex) and all(
        "Authorization" not in headers for headers in other.headers()
    ), "a token is sent only to the URLs it was given for"


async def test_basic_auth_from_netrc(
    tmp_path: Path, store: Store, server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = store.chunks
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {PASSWORD}\n")
    netrc.chmod(0o600)
    server.auth = basic
    monkeypatch.setenv("NETRC", os.fspath(netrc))
    async with fetching([server.url], tmp_path / "c1") as (fetcher, _):
        await fetcher.ensure(chunks[0])
        labels = list(fetcher.statistics().blobs_by_source)
    assert labels == [f"http://127.0.0.1:{server.port}"]


async def test_a_redirect_outside_a_tokens_scope_goes_without_it(
    tmp_path: Path, store: Store, serve: FaultServers
) -> None:
    """Issue 11, item 13: httpx copies ``Authorization`` to a same-origin redirect whatever
    its path; a token for ``/store/`` must not reach ``/elsewhere/`` that way (blobs,
    through the async client, and documents, through the blocking one)."""
    chunks = store.chunks
    shutil.copytree(store.root, tmp_path / "elsewhere" / "store")
    shutil.copytree(store.root, tmp_path / "store" / "mirror" / "store")
    server = serve(tmp_path)  # serves store/ (the fixture's root), elsewhere/, store/mirror/
    auth_file = tmp_path / "auth"
    auth_file.write_text(f"{server.url}/store/ bearer {TOKEN}\n")
    auth_file.chmod(0o600)
    config = replace(FAST, auth_file=os.fspath(auth_file))
    outside, inside = (f"/store/blobs/blake3/{chunk.hex}" for chunk in chunks[:2])
    server.fault(outside, Fault(redirect=f"{server.url}/elsewhere"))
    server.fault(inside, Fault(redirect=f"{server.url}/store/mirror"))
    async with fetching([f"{server.url}/store/"], tmp_path / "cache", config) as (fetcher, _):
        await fetcher.ensure(chunks[0])
        await fetcher.ensure(chunks[1])
    assert server.headers(outside)[0]["Authorization"] == f"Bearer {TOKEN}"
    assert "Authorization" not in server.headers(f"/elsewhere{outside}")[0]
    assert server.headers(f"/store/mirror{inside}")[0]["Authorization"] == f"Bearer {TOKEN}"
    (tmp_path / "store" / "doc").write_bytes(b"manifest")
    (tmp_path / "elsewhere" / "store" / "doc").write_bytes(b"manifest")
    server.fault("/store/doc", Fault(redirect=f"{server.url}/elsewhere"))
    assert download(f"{server.url}/store/doc", max_bytes=100, config=config) == b"manifest"
    assert server.headers("/store/doc")[0]["Authorization"] == f"Bearer {TOKEN}"
    assert "Authorization" not in server.headers("/elsewhere/store/doc")[0]


def test_urls_with_credentials_are_refused_on_the_command_line(tmp_path: Path) -> None:
    """A password in a command line is visible to every user (``ps``) for the life of the
    mount daemon forked from it, so ``--store`` and IMAGE URLs may not carry one."""
    url = f"http://alice:{PASSWORD}@127.0.0.1:9/store/"
    image = write_image(tmp_path / "image", {"/a": b"a"})
    (tmp_path / "mnt").mkdir()
    for args in (
        ["mount", os.fspath(image.ocix), os.fspath(tmp_path / "mnt"), "--store", url],
        ["mount", f"{url}image.ocix", os.fspath(tmp_path / "mnt")],
        ["extract", f"{url}image.ocix", os.fspath(tmp_path / "out")],
        ["diff", f"{url}a.ocix", f"{url}b.ocix"],
    ):
        result = run_ocixfs(*args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and PASSWORD not in result.stderr
        assert "visible to every user (ps); put them in a --store-auth file" in result.stderr
    assert not is_mounted(tmp_path / "mnt") and not (tmp_path / "out").exists()


def test_credentials_never_show_their_secrets(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth"
    auth_file.write_text(f"https://a.example/store bearer {TOKEN}\n")
    credentials = load_credentials(os.fspath(auth_file), use_netrc=False)
    assert TOKEN not in repr(credentials)
    import httpx

    assert credentials.header_for(httpx.URL("https://a.example/store/blobs/x")) == (
        f"Bearer {TOKEN}"
    )
    assert credentials.header_for(httpx.URL("https://a.example/storefront/x")) is None
    assert credentials.header_for(httpx.URL("http://a.example/store/x")) is None
    auth_file.write_text(f"https://a.example/ token {TOKEN}\n")
    with pytest.raises(UsageError, match="line 1") as caught:
        load_credentials(os.fspath(auth_file))
    assert TOKEN not in str(caught.value)
    assert redact(f"https://alice:{PASSWORD}@h.example:8443/s/") == "https://h.example:8443/s/"
    from ocixfs.cli.mount import _fsname  # the mount source /proc/mounts shows

    assert PASSWORD not in _fsname(f"https://alice:{PASSWORD}@h.example")


# --- small documents (manifests, profiles) -----------------------------------------------


def test_download_is_bounded(tmp_path: Path, serve: FaultServers) -> None:
    (tmp_path / "doc").write_bytes(b"x" * 1000)
    slow = replace(FAST, min_rate=1_000_000, rate_window=0.3)
    server = serve(tmp_path)
    assert download(f"{server.url}/doc", max_bytes=1000) == b"x" * 1000
    with pytest.raises(FormatError, match="larger than the limit of 999 bytes"):
        download(f"{server.url}/doc", max_bytes=999)
    with pytest.raises(BlobNotFound, match="HTTP 404"):
        download(f"{server.url}/nothing", max_bytes=1000)
    server.fault("doc", Fault(endless=True))
    with pytest.raises(FormatError, match="larger than"):
        download(f"{server.url}/doc", max_bytes=1 << 20)
    server.fault("doc", Fault(endless=True, rate=50_000))
    with pytest.raises(FetchError, match="below the minimum rate"):
        download(f"{server.url}/doc", max_bytes=1 << 30, config=slow)
    server.fault("doc", Fault(status=500))
    with pytest.raises(FetchError, match="HTTP 500"):
        download(f"{server.url}/doc", max_bytes=1000)


def test_download_just_above_the_minimum_rate_ends_at_its_deadline(
    tmp_path: Path, serve: FaultServers, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest or profile trickled just above the minimum rate (here 2x, which would
    take 20 s) ends at the overall deadline; a profile beside a URL image gets at most the
    read deadline, since the mount waits for it."""
    (tmp_path / "image.ocix").write_bytes(b"m" * 40_000)
    (tmp_path / "image.ocix.profile").write_bytes(b"p" * 40_000)
    server = serve(tmp_path)
    server.fault("*", Fault(rate=2000))
    trickle = replace(FAST, min_rate=1000, rate_window=0.2, document_deadline=1.5, deadline=0.7)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"image.ocix: not received within 1.5 s"):
        download(f"{server.url}/image.ocix", max_bytes=1 << 20, config=trickle)
    assert 1.5 <= time.monotonic() - started < 4
    started = time.monotonic()
    assert profile_beside(f"{server.url}/image.ocix", trickle) is None
    assert time.monotonic() - started < 3
    assert "image.ocix.profile: not received within 0.7 s" in caplog.text


def test_download_decodes_compressed_documents_within_the_limit(
    tmp_path: Path, serve: FaultServers
) -> None:
    document = os.urandom(3000) * 20  # compressible: 60,000 bytes
    (tmp_path / "doc").write_bytes(document)
    server = serve(tmp_path)
    url = f"{server.url}/doc"
    packed = {
        "gzip": gzip.compress(document),
        "zstd": zstandard.ZstdCompressor().compress(document),
    }
    for encoding, body in packed.items():
        server.fault("doc", Fault(body=body, content_encoding=encoding))
        assert download(url, max_bytes=len(document)) == document
        assert server.headers("doc")[-1]["Accept-Encoding"] == "zstd, gzip"
        with pytest.raises(FormatError, match="larger than the limit"):
            download(url, max_bytes=len(document) - 1)  # decoded size counts
        server.fault("doc", Fault(body=body[: len(body) // 2], content_encoding=encoding))
        with pytest.raises(FetchError, match=f"truncated {encoding} body|corrupt {encoding}"):
            download(url, max_bytes=len(document))
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 64 MiB of zeros
    server.fault("doc", Fault(body=bomb, content_encoding="zstd"))
    with pytest.raises(FormatError, match="larger than the limit"):
        download(url, max_bytes=1 << 20)
    server.fault("doc", Fault(body=b"???", content_encoding="br"))
    with pytest.raises(FetchError, match="unsupported Content-Encoding 'br'"):
        download(url, max_bytes=1000)


# --- real mounts -------------------------------------------------------------------------

FILES = {
    "/etc/hostname": b"reliable\n",
    "/data/a.bin": os.urandom(200_000),
    "/data/b.bin": os.urandom(300_000),
    "/data/c.bin": os.urandom(1000),
}


@pytest.fixture
def image(tmp_path: Path) -> Image:
    """An image of ``FILES`` and its store (``tests.reliabilitykit.write_image``)."""
    return write_image(tmp_path / "image", FILES)


@needs_fuse
@needs_openssl
@pytest.mark.mount
def test_mount_over_tls_with_a_token_keeps_secrets_out_of_logs(
    tmp_path: Path, certs: Certs, image: Image, serve: FaultServers
) -> None:
    auth_file = tmp_path / "auth"
    log_file = tmp_path / "daemon.log"
    server = serve(image.store, tls=server_context(certs))
    server.auth = f"Bearer {TOKEN}"
    auth_file.write_text(f"{server.url}/ bearer {TOKEN}\n")
    auth_file.chmod(0o600)
    store = f"https://127.0.0.1:{server.port}/"
    server.fault(image.hexes("/data/c.bin")[0], Fault(status=404))  # a failure to log
    with Mount(image.ocix, tmp_path / "mnt", *mount_args(
        store, tmp_path / "cache", "--ca-file", os.fspath(certs.ca),
        "--store-auth", os.fspath(auth_file), "--log-file", os.fspath(log_file),
    )) as mount:
        for path in ("/etc/hostname", "/data/a.bin"):
            assert (mount.mountpoint / path[1:]).read_bytes() == FILES[path]
        assert read_or_errno(mount.mountpoint / "data/c.bin") == errno.EIO
        stats = json.dumps(mount.stats())
        assert f"https://127.0.0.1:{server.port}/" in stats
    with open("/proc/self/mounts") as mounts:
        shown = [stats, log_file.read_text(), mounts.read()]
    assert "blob" in shown[1] and "HTTP 404" in shown[1]  # the log did record the failure
    for text in shown:
        assert TOKEN not in text


@needs_fuse
@needs_openssl
@pytest.mark.mount
def test_mount_without_the_ca_fails_reads_not_the_mount(
    tmp_path: Path, certs: Certs, image: Image, serve: FaultServers
) -> None:
    server = serve(image.store, tls=server_context(certs))
    with Mount(image.ocix, tmp_path / "mnt", *mount_args(server.url, tmp_path / "cache")) as mount:
        assert read_or_errno(mount.mountpoint / "etc/hostname") == errno.EIO
        assert server.count() == 0
        assert sorted(os.listdir(mount.mountpoint / "data")) == ["a.bin", "b.bin", "c.bin"]


@needs_fuse
@pytest.mark.mount
def test_mount_uses_the_proxy_from_the_environment(
    tmp_path: Path, image: Image, serve: FaultServers, no_proxy_env: pytest.MonkeyPatch
) -> None:
    origin = serve(image.store)
    with ForwardProxy() as proxy:
        no_proxy_env.setenv("HTTP_PROXY", proxy.url)
        with Mount(image.ocix, tmp_path / "mnt", *mount_args(origin.url, tmp_path / "c")) as m:
            assert (m.mountpoint / "data/b.bin").read_bytes() == FILES["/data/b.bin"]
        assert f"{origin.url}/blobs/blake3/{image.hexes('/data/b.bin')[0]}" in proxy.requests


@needs_fuse
@pytest.mark.mount
def test_read_of_an_unreachable_file_ends_in_eio_and_its_reader_is_killable(
    tmp_path: Path, image: Image, serve: FaultServers
) -> None:
    deadline = 3.0
    server = serve(image.store)
    with Mount(image.ocix, tmp_path / "mnt", *mount_args(
        server.url, tmp_path / "cache", "--deadline", str(deadline), "--timeout", "60"
    )) as mount:
        assert (mount.mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
        for path in ("/data/a.bin", "/data/b.bin"):  # accepts, then never answers
            server.fault(image.hexes(path)[0], Fault(stall=600))
        target = mount.mountpoint / "data/a.bin"
        reader = subprocess.Popen([sys.executable, "-c", _READ_ONCE, os.fspath(target)])
        try:
            wait_for(lambda: server.count(image.hexes("/data/a.bin")[0]) > 0,
                     what="the daemon to ask the server")
            reader.send_signal(signal.SIGKILL)
            # the kernel holds a killed reader until the daemon answers: the deadline
            assert reader.wait(timeout=deadline * 2 + 20) == -signal.SIGKILL
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        started = time.monotonic()
        assert read_or_errno(mount.mountpoint / "data/b.bin") == errno.EIO
        assert time.monotonic() - started < deadline * 2 + 20
        assert mount.stats()["pid"] == mount.pid  # the daemon is still there
        assert (mount.mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
    assert not is_mounted(tmp_path / "mnt")


_READ_ONCE = "import sys; open(sys.argv[1], 'rb').read()"


@pytest.mark.parametrize(
    "option", [["--store-auth", "/nonexistent/auth"], ["-o", "timeout=soon"]]
)
def test_bad_network_options_are_one_line_errors(tmp_path: Path, option: list[str]) -> None:
    image = write_image(tmp_path / "image", {"/f": b"f"})
    (tmp_path / "mnt").mkdir()
    result = run_ocixfs(
        "mount", os.fspath(image.ocix), os.fspath(tmp_path / "mnt"), "--store",
        os.fspath(image.store), *option, check=False, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("ocixfs: ") and result.stderr.count("\n") == 1
    assert not is_mounted(tmp_path / "mnt")
