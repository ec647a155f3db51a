"""A manifest URL mounted again is only asked for if it changed (``cache.manifests``):
real nginx (ETag, Last-Modified, 304), real mounts. An unchanged manifest costs a 304 and
the tree comes from the image index; a changed one is downloaded and served; a pin to
another digest, or a lost index, downloads it whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ocixfs.cache.index import index_path
from ocixfs.cache.manifests import (
    KEEP_RECORDS,
    KnownDocument,
    digest_of,
    file_version,
    recall,
    recall_body,
    remember,
)
from ocixfs.http import Validators
from ocixfs.image.format import manifest_digest
from ocixfs.mount.profile import Profile, encode_profile, profile_beside
from tests.mounting import OCIXFS, Mounts, is_mounted, needs_fuse, run_ocixfs, wait_for
from tests.nginx import CONFIG, Nginx

pytestmark = [needs_fuse, pytest.mark.mount]


def build(site: Path, text: str, version: int = 1) -> Path:
    """An image whose /etc/motd says ``text``, as ``site/image.ocix`` with its store in
    ``site/store`` (shared by every version); ``version`` sets its mtime apart (nginx's
    ETag is made of the mtime and the size, and both texts have the same size)."""
    source = site.parent / f"src-{time.monotonic_ns()}"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "motd").write_text(text)
    image = site / "image.ocix"
    built = site / "image.ocix.new"
    run_ocixfs("build", f"dir:{source}", "--store", os.fspath(site / "store"), "--output",
               os.fspath(built))
    os.utime(built, (1_700_000_000 + 100 * version,) * 2)
    built.replace(image)
    return image


def manifest_statuses(server: Nginx) -> list[str]:
    """The status of every GET of the manifest, in order."""
    log = (server.work / "access.log").read_text().splitlines()
    return [line.split('"')[2].split()[0] for line in log if "GET /image.ocix " in line]


def mount_and_read(mounts: Mounts, server: Nginx, tmp_path: Path, *more: str) -> str:
    mountpoint = tmp_path / "mnt"
    with mounts(f"{server.url}image.ocix", mountpoint, "--store", f"{server.url}store/",
                "--cache-dir", os.fspath(tmp_path / "cache"), *more):
        return (mountpoint / "etc" / "motd").read_text()


def wait_for_index(cache: Path, image: Path) -> None:
    path = index_path(cache, manifest_digest(image.read_bytes()))
    wait_for(path.exists, what="the image index")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "site").mkdir()
    return tmp_path / "site"


def test_an_unchanged_manifest_costs_a_304_and_a_changed_one_is_served(
    tmp_path: Path, site: Path, mounts: Mounts
) -> None:
    image = build(site, "version 1\n")
    with Nginx(site, tmp_path / "nginx") as server:
        assert mount_and_read(mounts, server, tmp_path) == "version 1\n"
        wait_for_index(tmp_path / "cache", image)
        assert mount_and_read(mounts, server, tmp_path) == "version 1\n"
        assert manifest_statuses(server) == ["200", "304"]
        records = list((tmp_path / "cache" / "manifests").iterdir())
        assert len(records) == 1 and records[0].stat().st_mode & 0o077 == 0
        record = json.loads(records[0].read_text())
        assert record["url"] == f"{server.url}image.ocix"
        assert record["digest"] == manifest_digest(image.read_bytes())

        build(site, "version 2\n", version=2)
        assert mount_and_read(mounts, server, tmp_path) == "version 2\n"
        assert manifest_statuses(server) == ["200", "304", "200"]


def test_a_pin_to_another_digest_or_a_lost_index_downloads_the_manifest_whole(
    tmp_path: Path, site: Path, mounts: Mounts
) -> None:
    image = build(site, "pinned\n")
    digest = manifest_digest(image.read_bytes())
    cache = tmp_path / "cache"
    with Nginx(site, tmp_path / "nginx") as server:
        assert mount_and_read(mounts, server, tmp_path, "--digest", digest) == "pinned\n"
        wait_for_index(cache, image)
        shutil.rmtree(cache / "index")  # the record stays, its tree is gone
        assert mount_and_read(mounts, server, tmp_path) == "pinned\n"
        assert manifest_statuses(server) == ["200", "304", "200"]
        wait_for_index(cache, image)
        # Pinned to a manifest the index holds: nothing to ask the server.
        assert mount_and_read(mounts, server, tmp_path, "--digest", digest) == "pinned\n"
        assert manifest_statuses(server) == ["200", "304", "200"]
        # A record of another manifest (planted: a server that once sent another) is not
        # trusted for a pinned mount whose manifest is not indexed: it asks unconditionally.
        shutil.rmtree(cache / "index")
        record = next((cache / "manifests").iterdir())
        planted = json.loads(record.read_text()) | {"digest": "b3:" + "0" * 64}
        record.write_text(json.dumps(planted))
        assert mount_and_read(mounts, server, tmp_path, "--digest", digest) == "pinned\n"
        assert manifest_statuses(server) == ["200", "304", "200", "200"]


FRESH_FOR_A_WHILE = CONFIG.replace("location / {{ }}", """\
location / {{ }}
        location = /image.ocix {{ add_header Cache-Control "{cache_control}"; }}""")


@pytest.mark.parametrize("cache_control", ["max-age=600", "public, max-age=0", "no-cache"])
def test_a_manifest_is_not_asked_for_while_the_server_says_it_is_fresh(
    tmp_path: Path, site: Path, mounts: Mounts, cache_control: str
) -> None:
    """RFC 9111 freshness: within ``max-age`` of the last answer a mount of the URL asks
    nothing; once it has passed (the record's clock moved back here), a 304 refreshes it;
    ``max-age=0`` and ``no-cache`` ask every time."""
    image = build(site, "fresh\n")
    cache = tmp_path / "cache"
    with Nginx(site, tmp_path / "nginx", config=FRESH_FOR_A_WHILE,
               cache_control=cache_control) as server:
        assert mount_and_read(mounts, server, tmp_path) == "fresh\n"
        wait_for_index(cache, image)
        assert mount_and_read(mounts, server, tmp_path) == "fresh\n"
        fresh = cache_control == "max-age=600"
        assert manifest_statuses(server) == (["200"] if fresh else ["200", "304"])
        record_path = next((cache / "manifests").iterdir())
        record = json.loads(record_path.read_text())
        assert record["max_age"] == (600 if fresh else 0)
        record_path.write_text(json.dumps(record | {"checked": record["checked"] - 601}))
        assert mount_and_read(mounts, server, tmp_path) == "fresh\n"
        assert manifest_statuses(server)[-1] == "304"
        if fresh:  # the 304 made it fresh again
            assert mount_and_read(mounts, server, tmp_path) == "fresh\n"
            assert manifest_statuses(server) == ["200", "304"]


FRESH_EVERYWHERE = CONFIG.replace(
    "location / {{ }}", 'location / {{ add_header Cache-Control "max-age=600" always; }}')


def document_statuses(server: Nginx) -> list[tuple[str, str]]:
    """(path, status) of every GET of the manifest or of a profile beside it, in order."""
    log = (server.work / "access.log").read_text().splitlines()
    return [(line.split('"')[1].split()[1], line.split('"')[2].split()[0]) for line in log
            if "GET /image.ocix" in line]


def played_profile(mounts: Mounts, server: Nginx, tmp_path: Path) -> object:
    with mounts(f"{server.url}image.ocix", tmp_path / "mnt", "--store", f"{server.url}store/",
                "--cache-dir", os.fspath(tmp_path / "cache")) as mount:
        assert (mount.mountpoint / "etc" / "motd").read_text() == "profiled\n"
        return mount.stats()["played_profile"]


@pytest.mark.parametrize("published", [True, False], ids=["profile", "no-profile"])
def test_a_profile_beside_a_url_is_remembered_like_the_manifest(
    tmp_path: Path, site: Path, mounts: Mounts, published: bool
) -> None:
    """The profile beside a manifest URL follows the manifest's rules: while the server's
    answer is fresh (a 404 too) a mount asks nothing at all and plays the copy kept in the
    cache; after that a 304 keeps it, and a changed profile is played."""
    image = build(site, "profiled\n")
    profile = site / "image.ocix.profile"
    if published:
        profile.write_bytes(encode_profile(Profile((("/etc/motd", 0),))))
    cache = tmp_path / "cache"
    with Nginx(site, tmp_path / "nginx", config=FRESH_EVERYWHERE) as server:
        first = played_profile(mounts, server, tmp_path)
        assert (first is not None) == published
        wait_for_index(cache, image)
        again = played_profile(mounts, server, tmp_path)
        if published:  # (else the host's own recording of the first mount plays)
            assert again == first
        statuses = [("/image.ocix", "200"),
                    ("/image.ocix.profile", "200" if published else "404")]
        assert sorted(document_statuses(server)) == statuses
        if not published:
            return
        records = sorted((cache / "manifests").glob("*.json"))
        for path in records:  # a server's answer that has grown stale
            record = json.loads(path.read_text())
            path.write_text(json.dumps(record | {"checked": record["checked"] - 601}))
        assert played_profile(mounts, server, tmp_path) == first
        assert sorted(document_statuses(server)[2:]) == [("/image.ocix", "304"),
                                                        ("/image.ocix.profile", "304")]

        profile.write_bytes(encode_profile(Profile((("/etc/motd", 0), ("/nothing", 1)))))
        os.utime(profile, (1_700_000_900,) * 2)
        for path in records:
            record = json.loads(path.read_text())
            path.write_text(json.dumps(record | {"checked": record["checked"] - 601}))
        changed = played_profile(mounts, server, tmp_path)
        assert isinstance(changed, dict) and changed["paths"] == 2
        assert document_statuses(server)[-2:] in (
            [("/image.ocix", "304"), ("/image.ocix.profile", "200")],
            [("/image.ocix.profile", "200"), ("/image.ocix", "304")])


def test_a_kept_profile_that_does_not_hash_to_its_record_is_downloaded_again(
    tmp_path: Path, site: Path
) -> None:
    build(site, "profiled\n")
    played = Profile((("/etc/motd", 0),))
    (site / "image.ocix.profile").write_bytes(encode_profile(played))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    with Nginx(site, tmp_path / "nginx", config=FRESH_EVERYWHERE) as server:
        url = f"{server.url}image.ocix"
        assert profile_beside(url, cache_dir=cache) == played
        assert profile_beside(url, cache_dir=cache) == played
        assert [s for _, s in document_statuses(server)] == ["200"]
        (kept,) = (cache / "manifests").glob("*.body")
        kept.write_bytes(encode_profile(Profile((("/etc/shadow", 0),))))
        assert profile_beside(url, cache_dir=cache) == played
        assert [s for _, s in document_statuses(server)] == ["200", "200"]
        assert profile_beside(url) == played  # no cache named: asks every time
        assert len(document_statuses(server)) == 3


def _mount_traced(image: Path, site: Path, tmp_path: Path, trace: Path) -> str:
    """Mount ``image`` in the foreground under strace (files it opens go to ``trace``),
    read /etc/motd, unmount; what it read."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    command = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o",
               os.fspath(trace), *OCIXFS, "mount", "--foreground", "--no-service",
               os.fspath(image), os.fspath(mountpoint), "--store", os.fspath(site / "store"),
               "--cache-dir", os.fspath(tmp_path / "cache")]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            wait_for(lambda: is_mounted(mountpoint), what="the mount")
            return (mountpoint / "etc" / "motd").read_text()
        finally:
            run_ocixfs("umount", os.fspath(mountpoint), check=False)
            proc.wait(timeout=30)


def test_a_manifest_file_mounted_again_unchanged_is_not_even_read(
    tmp_path: Path, site: Path
) -> None:
    """A local manifest whose device, inode, size, mtime and ctime are those recorded when
    this host last read it is not opened again (its tree comes from the index); one
    replaced, or written in place, is read and served."""
    image = build(site, "version 1\n")
    cache = tmp_path / "cache"
    wait_for(lambda: file_version(os.fspath(image)) is not None, what="a settled file")
    opened = [tmp_path / f"trace{n}" for n in range(4)]
    assert _mount_traced(image, site, tmp_path, opened[0]) == "version 1\n"
    wait_for_index(cache, image)
    assert _mount_traced(image, site, tmp_path, opened[1]) == "version 1\n"
    named = f'"{image}"'  # as strace quotes it (not IMAGE.profile)
    assert named in opened[0].read_text()
    assert named not in opened[1].read_text()

    rebuilt = build(site, "version 2\n", version=2)  # a new file renamed over it
    assert _mount_traced(rebuilt, site, tmp_path, opened[2]) == "version 2\n"
    assert named in opened[2].read_text()

    (tmp_path / "other-site").mkdir()
    other = build(tmp_path / "other-site", "version 3\n", version=3)
    wait_for(lambda: file_version(os.fspath(image)) is not None, what="a settled file")
    assert _mount_traced(image, site, tmp_path, opened[3]) == "version 2\n"
    inode = image.stat().st_ino
    with image.open("r+b") as file:  # written in place: the same inode
        file.write(other.read_bytes())
        file.truncate()
    assert image.stat().st_ino == inode
    shutil.copytree(other.parent / "store", site / "store", dirs_exist_ok=True)
    assert _mount_traced(image, site, tmp_path, opened[3]) == "version 3\n"


def test_records_are_kept_for_the_most_recently_used_urls(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    records = cache / "manifests"

    def url(n: int) -> str:
        return f"http://origin.example/{n}.ocix.profile"

    def record(n: int) -> None:
        body = b"profile %d" % n
        remember(cache, url(n), KnownDocument(digest_of(body), Validators(etag=f'"{n}"'), 0.0),
                 body)

    for n in range(KEEP_RECORDS):
        record(n)
        (path,) = [p for p in records.glob("*.json")
                   if json.loads(p.read_text())["url"] == url(n)]
        os.utime(path, (1_000 + n, 1_000 + n))  # written in that order
    used = recall(cache, url(0))  # the oldest, used again
    assert used is not None
    record(KEEP_RECORDS)
    assert len(list(records.glob("*.json"))) == len(list(records.glob("*.body"))) == KEEP_RECORDS
    assert recall(cache, url(1)) is None  # the least recently used: gone, body and all
    assert recall_body(cache, url(0), used, 1 << 20) == b"profile 0"
    latest = recall(cache, url(KEEP_RECORDS))
    assert latest is not None
    assert recall_body(cache, url(KEEP_RECORDS), latest, 1 << 20) == b"profile %d" % KEEP_RECORDS
