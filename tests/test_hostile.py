"""Hostile input (issue 5, item 3): malicious manifests, a hostile blob server, fuzzing.

- The corpus in ``tests/hostile/`` (written by ``tests/hostile/make_corpus.py``): each
  file is refused by the decoder for its intended reason, and by the real ``ocixfs
  inspect`` and ``ocixfs mount`` with one line on stderr, exit status 1, nothing mounted,
  under an address-space limit and a time limit.
- A real file with millions of entries, written at test time.
- A hypothesis fuzz test that mutates the corpus (the decoder's own fuzz tests over random
  bytes and mutated valid manifests are in ``test_format_props.py``).
- A hostile server against a real mount: every misbehaviour ends in EIO or correct bytes,
  never wrong bytes in a reader or in the cache, and the daemon survives.
- The builder resolves names and links inside the image root.
"""

from __future__ import annotations

import concurrent.futures
import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocixfs.errors import FormatError
from ocixfs.image.format import Entry, Kind, Manifest, decode, encode
from tests.faultserver import Fault, FaultServer
from tests.hostile import make_corpus
from tests.imagetools import file, hardlink, symlink
from tests.mounting import (
    OCIXFS,
    Mount,
    Mounts,
    is_mounted,
    needs_fuse,
    run_ocixfs,
    wait_for,
)
from tests.reliabilitykit import mount_args, read_or_errno, write_image
from tests.test_build_layers import build_layers

CORPUS = Path(__file__).parent / "hostile"
CASES: dict[str, dict[str, str | None]] = json.loads((CORPUS / "cases.json").read_text())
HOSTILE = sorted(name for name, info in CASES.items() if info["expect"] is not None)
REPO = Path(__file__).parent.parent


def _decode_message(data: bytes, name: str) -> str:
    with pytest.raises(FormatError) as caught:
        decode(data, source=name)
    return str(caught.value)


def _one_line(stderr: str) -> bool:
    return stderr.startswith("ocixfs: ") and stderr.count("\n") == 1 and "Traceback" not in stderr


# --- the corpus --------------------------------------------------------------------------


def test_corpus_is_what_its_generator_writes() -> None:
    cases = make_corpus.build_cases()
    assert sorted(f"{name}.ocix" for name in cases) == sorted(CASES)
    assert sorted(path.name for path in CORPUS.glob("*.ocix")) == sorted(CASES)
    for name, (data, info) in cases.items():
        assert (CORPUS / f"{name}.ocix").read_bytes() == data, f"regenerate {name}"
        assert CASES[f"{name}.ocix"] == info
    assert len(HOSTILE) >= 100


def test_baseline_of_the_corpus_is_valid() -> None:
    """Every case is this valid manifest with one thing wrong."""
    manifest = decode((CORPUS / "baseline.ocix").read_bytes())
    assert encode(manifest) == (CORPUS / "baseline.ocix").read_bytes()
    assert "/usr/bin/tool2" in manifest.entries


@pytest.mark.parametrize("name", HOSTILE)
def test_decoder_refuses_for_the_intended_reason(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    started = time.monotonic()
    message = _decode_message(data, name)
    assert time.monotonic() - started < 5
    expect = CASES[name]["expect"]
    assert expect is not None and expect in message
    assert message.startswith(f"{name}: ") and "\n" not in message and len(message) < 600
    assert message.isprintable()


def test_commands_refuse_every_case_in_one_line_within_limits(tmp_path: Path) -> None:
    """The real ``inspect`` and ``mount`` command lines, one forked process per run, each
    under a 1 GiB address-space limit (see tests/hostile/driver.py)."""
    mountpoint, store = tmp_path / "mnt", tmp_path / "store"
    mountpoint.mkdir()
    store.mkdir()
    files = [os.fspath(CORPUS / name) for name in HOSTILE]
    result = subprocess.run(
        [sys.executable, "-m", "tests.hostile.driver", os.fspath(mountpoint), os.fspath(store),
         *files],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(runs) == 2 * len(HOSTILE)
    for run in runs:
        what = f"{run['command']} {run['file']}: {run['stderr']!r}"
        assert run["status"] == 1, what
        assert _one_line(run["stderr"]), what
        assert CASES[run["file"]]["expect"] in run["stderr"], what
        assert run["seconds"] < 60, what
    assert not is_mounted(mountpoint)
    assert os.listdir(mountpoint) == []


def test_manifest_reading_needs_memory_for_the_file_not_the_limit(tmp_path: Path) -> None:
    """``read(limit + 1)`` would reserve the whole 1 GiB limit for a 300-byte file."""
    from ocixfs.image.loading import read_limited

    (tmp_path / "small").write_bytes(b"12345")
    (tmp_path / "big").write_bytes(b"x" * 20)
    with (tmp_path / "small").open("rb") as small, (tmp_path / "big").open("rb") as big:
        assert read_limited(small, 1 << 40) == b"12345"
        assert read_limited(big, 10) == b"x" * 11
    read_end, write_end = os.pipe()
    os.write(write_end, b"y" * 30)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert read_limited(pipe, 10) == b"y" * 11


REPRESENTATIVE = [("huge-bstr-length.ocix", "inspect"), ("files-claims-10-million.ocix", "mount"),
                  ("deep-nested-arrays.ocix", "mount"), ("path-dotdot-escape.ocix", "inspect")]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_separate_processes_refuse_representative_cases(tmp_path: Path) -> None:
    """The same through ``python -m ocixfs`` exactly as a user runs it."""
    (tmp_path / "mnt").mkdir()

    def refuse(name: str, command: str) -> subprocess.CompletedProcess[str]:
        args = [os.fspath(CORPUS / name)]
        if command == "mount":
            args += [os.fspath(tmp_path / "mnt"), "--store", os.fspath(tmp_path)]
        return subprocess.run(
            ["prlimit", "--as=1073741824", "--cpu=60", *OCIXFS, command, *args],
            capture_output=True, text=True, timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: refuse(*job), REPRESENTATIVE))
    for (name, command), result in zip(REPRESENTATIVE, results, strict=True):
        assert result.returncode == 1, (name, command, result.stderr)
        assert _one_line(result.stderr), (name, command, result.stderr)
    assert not is_mounted(tmp_path / "mnt")


def _many_entries(count: int) -> Iterator[bytes]:
    """A real manifest with ``count`` tiny entries (named /0000000 ... in canonical order),
    in pieces."""
    fifo = make_corpus.cmap({"mode": make_corpus.mode(), "type": make_corpus.text("fifo"),
                             "fifo": make_corpus.array()})
    yield make_corpus.head(6, make_corpus.OCIX_TAG) + b"\xa2"
    yield make_corpus.text("files") + make_corpus.head(5, count)
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        yield b"".join(b"\x68/%07x" % i + fifo for i in range(start, stop))
    yield make_corpus.text("version") + make_corpus.uint(1)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_millions_of_real_entries_are_refused_in_bounded_memory_and_time(
    tmp_path: Path,
) -> None:
    """4,000,001 entries (one over the default limit): refused from the map header."""
    big = tmp_path / "millions.ocix"
    with big.open("wb") as out:
        out.writelines(_many_entries(4_000_001))
    assert big.stat().st_size > 100 << 20
    started = time.monotonic()
    result = subprocess.run(
        ["prlimit", "--as=1073741824", "--cpu=60", *OCIXFS, "inspect", os.fspath(big)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and _one_line(result.stderr), result.stderr
    assert "4000001 entries exceed the limit" in result.stderr
    assert time.monotonic() - started < 60


def test_many_entries_under_the_limit_decode() -> None:
    """The generator writes valid entries: a small count decodes (so the refusal above is
    about the count, not about a broken file)."""
    assert len(decode(b"".join(_many_entries(1000))).entries) == 1000


# --- fuzzing -----------------------------------------------------------------------------

MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "delete", "insert", "truncate"]),
              st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    min_size=1, max_size=4,
)


def _mutate(data: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, extra in mutations:
        at = int(where * len(out)) if out else 0
        if kind == "flip" and out:
            out[min(at, len(out) - 1)] ^= extra[0] or 1
        elif kind == "delete":
            del out[at : at + len(extra)]
        elif kind == "insert":
            out[at:at] = extra
        else:
            del out[at:]
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CASES)), MUTATIONS)
def test_mutated_corpus_gives_format_error_or_a_valid_manifest(
    name: str, mutations: list[tuple[str, float, bytes]]
) -> None:
    data = _mutate((CORPUS / name).read_bytes(), mutations)
    try:
        manifest = decode(data)
    except FormatError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(manifest, Manifest)
    assert decode(encode(manifest)) == manifest


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="atheris supports CPython <= 3.11")
def test_atheris_script_runs_or_explains(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(CORPUS / "baseline.ocix", corpus)
    result = subprocess.run(
        [sys.executable, os.fspath(REPO / "scripts" / "fuzz_format.py"), "-runs=200",
         f"-artifact_prefix={tmp_path}/", os.fspath(corpus)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    if result.returncode == 2:
        assert "atheris is not installed" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-2000:]


# --- the builder -------------------------------------------------------------------------


def test_builder_keeps_links_and_names_inside_the_root(tmp_path: Path) -> None:
    """Escaping names are refused (test_build_layers.py); links that point above the root
    are resolved inside it, like the container runtime would."""
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest, _ = build_layers(
        tmp_path / "build",
        [symlink("up", "../../../../../.." + os.fspath(outside)), file("up/planted", b"x"),
         symlink("root", "/"), file("root/etc/passwd", b"root::0:0::/:/bin/sh\n"),
         hardlink("h", "up/planted")],
    )
    assert os.listdir(outside) == []
    assert manifest.entries[os.fspath(outside) + "/planted"].kind.value in ("link",
                                                                            "regularfile")
    assert manifest.entries["/etc/passwd"].size == len(b"root::0:0::/:/bin/sh\n")
    assert all(".." not in path.split("/") for path in manifest.entries)


# --- a hostile server against a real mount -----------------------------------------------

SERVER_FAULTS = {
    "wrong-content": Fault(tamper=True),
    "truncated": Fault(truncate=1000),
    "longer": Fault(extra=b"x" * 100),
    "endless": Fault(endless=True),
    "reset": Fault(reset=10_000),
    "stall": Fault(stall=600),
    "stall-mid-body": Fault(stall_body=600, stall_after=10_000),
    "html-200": Fault(body=b"<html><body>Please log in</body></html>\n"),
    "206-partial": Fault(status=206),
    "500": Fault(status=500),
    "gigantic-headers": Fault(header_bytes=1 << 20),
    "redirect-loop": Fault(redirect="SELF"),
}


def _files() -> dict[str, bytes]:
    files = {f"/hostile/{name}": os.urandom(60_000) for name in SERVER_FAULTS}
    files["/hostile/redirect-elsewhere"] = os.urandom(60_000)
    files["/ok"] = os.urandom(60_000)
    return files


def _reads_right(root: Path, path: str, content: bytes) -> Callable[[], bool]:
    return lambda: read_or_errno(root / path[1:]) == content


def _cache_is_verified(cache: Path) -> int:
    blobs = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    for blob in blobs:
        assert blake3.blake3(blob.read_bytes()).hexdigest() == blob.name, blob
    return len(blobs)


@needs_fuse
@pytest.mark.mount
def test_hostile_server_gives_eio_or_right_bytes_never_wrong_ones(tmp_path: Path) -> None:
    files = _files()
    image = write_image(tmp_path / "image", files)
    cache = tmp_path / "cache"
    with (
        FaultServer(image.store) as server,
        FaultServer(image.store, host="127.0.0.2") as elsewhere,
    ):
        for name, fault in SERVER_FAULTS.items():
            if fault.redirect == "SELF":
                fault = Fault(redirect=server.url)
            server.fault(image.hexes(f"/hostile/{name}")[0], fault)
        server.fault(image.hexes("/hostile/redirect-elsewhere")[0], Fault(redirect=elsewhere.url))
        with Mount(image.ocix, tmp_path / "mnt", *mount_args(
            server.url, cache, "--deadline", "3", "--timeout", "2"
        )) as mount:
            paths = sorted(files)
            with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
                got = dict(zip(paths, pool.map(
                    lambda p: read_or_errno(mount.mountpoint / p[1:]), paths), strict=True))
            for path, outcome in got.items():
                if path in ("/ok", "/hostile/redirect-elsewhere"):
                    assert outcome == files[path], path
                else:
                    assert outcome == errno.EIO, (path, outcome)
            assert mount.stats()["pid"] == mount.pid
            assert _cache_is_verified(cache) == 2
            server.clear()
            for path in paths:  # once the server behaves, everything reads right
                wait_for(_reads_right(mount.mountpoint, path, files[path]), timeout=60,
                         what=f"{path} after the faults")
        assert _cache_is_verified(cache) == len(files)


HOSTILE_FAILOVER = {
    "endless": Fault(endless=True),
    "html-200": Fault(body=b"<html>maintenance</html>"),
    "206-partial": Fault(status=206),
    "429": Fault(status=429),
    "gigantic-headers": Fault(header_bytes=1 << 20),
}


@pytest.mark.parametrize("fault", HOSTILE_FAILOVER.values(), ids=HOSTILE_FAILOVER.keys())
async def test_hostile_response_fails_over_to_the_next_mirror(
    tmp_path: Path, fault: Fault
) -> None:
    from tests.test_network import fetching

    image = write_image(tmp_path / "image", {"/f": os.urandom(70_000)})
    chunk = image.blobs["/f"][0]
    with FaultServer(image.store) as bad, FaultServer(image.store) as good:
        bad.fault(chunk.hex, fault)
        async with fetching([bad.url, good.url], tmp_path / "cache") as (fetcher, cache):
            with trio.fail_after(20):
                await fetcher.ensure(chunk)
            assert await cache.read(chunk, 0, chunk.size) == image.contents["/f"]
        assert (bad.count(chunk.hex), good.count(chunk.hex)) == (1, 1)


@pytest.mark.parametrize(
    ("fault", "expect"),
    [(Fault(body=b"<html>portal</html>"), "(at byte 0)"),
     (Fault(stall=600), "timed out"),
     (Fault(status=403), "HTTP 403")],
    ids=["html-200", "stall", "403"],
)
def test_mount_of_a_manifest_url_from_a_hostile_server_fails_in_one_line(
    tmp_path: Path, fault: Fault, expect: str
) -> None:
    image = write_image(tmp_path / "image", {"/f": b"f"})
    (tmp_path / "mnt").mkdir()
    with FaultServer(image.ocix.parent) as server:
        server.fault("image.ocix", fault)
        started = time.monotonic()
        result = run_ocixfs(
            "mount", f"{server.url}/image.ocix", os.fspath(tmp_path / "mnt"), "--store",
            os.fspath(image.store), "--timeout", "1", check=False, timeout=120,
        )
    assert result.returncode == 1 and _one_line(result.stderr), result.stderr
    assert expect in result.stderr
    assert time.monotonic() - started < 60
    assert not is_mounted(tmp_path / "mnt")


# --- side files: profiles and store files -----------------------------------------------


def _profile_bomb(entries: int) -> bytes:
    """A canonical profile of ``entries`` times ``["/", 0]`` (4 bytes each), gzip'ed:
    about 1/1000 of its size on the wire."""
    head = b"\xa2\x67entries\x9a" + entries.to_bytes(4, "big")
    body = head + b"\x82\x61/\x00" * entries + b"\x67version\x01"
    return gzip.compress(body, compresslevel=9)


def test_a_profile_bomb_beside_a_url_image_is_refused_from_its_header(tmp_path: Path) -> None:
    """12 million entries in 48 MB (under the 64 MiB size limit), 47 KB gzip'ed on the
    wire: refused from the list header, in a process limited to 1 GiB of address space,
    in seconds; the mount would go on without it."""
    bomb = _profile_bomb(12_000_000)
    assert len(bomb) < 64 << 10
    probe = (
        "import logging, sys\n"
        "from ocixfs.mount.profile import profile_beside\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "print(profile_beside(sys.argv[1]))\n"
    )
    (tmp_path / "image.ocix.profile").write_bytes(b"served with the fault's body instead")
    with FaultServer(tmp_path) as server:
        server.fault("image.ocix.profile", Fault(body=bomb, content_encoding="gzip"))
        started = time.monotonic()
        result = subprocess.run(
            ["prlimit", "--as=1073741824", "--cpu=60", sys.executable, "-c", probe,
             f"{server.url}/image.ocix"],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    assert "entries must be a list of at most 2000000" in result.stderr, result.stderr
    assert time.monotonic() - started < 30


@needs_fuse
@pytest.mark.mount
def test_fifos_planted_beside_the_image_and_in_the_store_hang_nothing(tmp_path: Path) -> None:
    """``IMAGE.ocix.profile``, ``ocix-store.json`` and one blob are FIFOs nobody writes to:
    the mount comes up (no profile), files read right (plain names), and the file whose
    blob is a FIFO fails with EIO at once instead of taking a worker thread for ever."""
    image = write_image(tmp_path / "image", {"/ok": os.urandom(5000), "/fifo": b"planted"})
    os.mkfifo(image.ocix.parent / "image.ocix.profile")
    os.mkfifo(image.store / "ocix-store.json")
    blob = image.store / "blobs" / "blake3" / image.hexes("/fifo")[0]
    blob.unlink()
    os.mkfifo(blob)
    started = time.monotonic()
    with Mount(image.ocix, tmp_path / "mnt", "--store", os.fspath(image.store), "--cache-dir",
               os.fspath(tmp_path / "cache"), "--deadline", "20") as mount:
        assert (mount.mountpoint / "ok").read_bytes() == image.contents["/ok"]
        assert read_or_errno(mount.mountpoint / "fifo") == errno.EIO
        assert time.monotonic() - started < 15
        assert (mount.mountpoint / "ok").read_bytes() == image.contents["/ok"]


@needs_fuse
@pytest.mark.mount
def test_a_file_larger_than_the_cache_quota_fails_at_once_without_a_download(
    tmp_path: Path,
) -> None:
    """A manifest naming a 3 MB blob (a v0 image's whole file, or a hostile size) under a
    1 MiB quota: EIO at once, nothing requested, nothing written; other files read."""
    image = write_image(tmp_path / "image", {"/big": os.urandom(3 << 20), "/ok": b"ok"})
    cache = tmp_path / "cache"
    with FaultServer(image.store) as server, Mount(image.ocix, tmp_path / "mnt", *mount_args(
        server.url, cache, "--cache-max-size", "1M"
    )) as mount:
        started = time.monotonic()
        assert read_or_errno(mount.mountpoint / "big") == errno.EIO
        assert time.monotonic() - started < 5
        assert server.count(image.hexes("/big")[0]) == 0
        assert (mount.mountpoint / "ok").read_bytes() == b"ok"
    assert os.listdir(cache / "tmp") == []


@needs_fuse
@pytest.mark.mount
def test_a_manifest_lying_about_a_shared_blobs_size_fails_its_read_not_the_others(
    tmp_path: Path, mounts: Mounts
) -> None:
    """Image ``good`` and image ``liar`` share a blob; ``liar`` declares it 1000 bytes
    longer. Reading it through ``liar`` fails with EIO and leaves the cached blob alone (it
    verifies against its name), so ``good`` keeps reading it without a refetch. A cached
    file that is really damaged (wrong size, wrong bytes) is dropped and fetched again."""
    content = os.urandom(50_000)
    good = write_image(tmp_path / "good", {"/shared": content})
    digest = blake3.blake3(content).digest()
    liar = tmp_path / "liar.ocix"
    liar.write_bytes(encode(Manifest(1, {
        "/": Entry(Kind.DIRECTORY, mode=0o755),
        "/shared": Entry(Kind.REGULAR, mode=0o644, size=len(content) + 1000, digest=digest),
    })))
    cache = tmp_path / "cache"
    cached_blob = cache / "blobs" / digest.hex()[:2] / digest.hex()
    with FaultServer(good.store) as server:
        honest = mounts(good.ocix, tmp_path / "m1", *mount_args(server.url, cache)).start()
        lying = mounts(liar, tmp_path / "m2", *mount_args(server.url, cache)).start()
        assert (honest.mountpoint / "shared").read_bytes() == content
        for _ in range(2):  # the kernel's retry, and a later read
            assert read_or_errno(lying.mountpoint / "shared") == errno.EIO
        assert cached_blob.read_bytes() == content
        honest.stop()
        honest = mounts(good.ocix, tmp_path / "m1", *mount_args(server.url, cache)).start()
        assert (honest.mountpoint / "shared").read_bytes() == content
        assert server.count(good.hexes("/shared")[0]) == 1
        honest.stop()
        cached_blob.write_bytes(b"damaged")  # wrong size and wrong bytes: dropped, refetched
        honest = mounts(good.ocix, tmp_path / "m1", *mount_args(server.url, cache)).start()
        assert (honest.mountpoint / "shared").read_bytes() == content
        assert server.count(good.hexes("/shared")[0]) == 2
        assert cached_blob.read_bytes() == content
