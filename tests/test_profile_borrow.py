"""Borrowing a profile across image versions: a first mount of an image this host never
ran plays the host profile of the related image it ran (most paths in common), not that of
an unrelated one, says so in ``ocixfs stats``, and records its own profile at unmount.

The choice itself is checked on trees built from manifests (no FUSE); the mounts are real,
served by nginx, and nothing stays mounted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import blake3
import pytest

from ocixfs.image.format import Entry, Kind, Manifest, manifest_digest
from ocixfs.image.tree import Tree
from ocixfs.mount.profile import (
    BORROW_MAX_BYTES,
    BORROW_TOTAL_BYTES,
    Profile,
    borrow_profile,
    cached_profile_path,
    encode_profile,
    locate_profile,
    save_profile,
)
from tests.mounting import Mounts, is_mounted, needs_fuse, run_ocixfs, store_args, wait_for
from tests.nginx import Nginx
from tests.test_mount import blob_requests, build, make_rootfs

DIGEST_N = "b3:" + "1" * 64
DIGEST_OTHER = "b3:" + "2" * 64
DIGEST_NEW = "b3:" + "3" * 64


def _tree(*paths: str) -> Tree:
    entries = {path: Entry(kind=Kind.REGULAR, mode=0o644) for path in paths}
    return Tree.from_manifest(Manifest(version=1, entries=entries))


def _host_profile(cache: Path, digest: str, paths: list[str], *, mtime: int) -> Path:
    path = cached_profile_path(cache, digest)
    save_profile(path, Profile(tuple((p, n) for n, p in enumerate(paths))))
    os.utime(path, (mtime, mtime))
    return path


NEW_TREE = ["/usr/bin/python3", "/usr/lib/python3/json.pyc", "/usr/lib/python3/email.pyc",
            "/usr/lib/python3/new-module.pyc", "/etc/hostname"]


def test_borrows_the_related_profile_and_not_an_unrelated_one(tmp_path: Path) -> None:
    tree = _tree(*NEW_TREE)
    related = ["/usr/bin/python3", "/usr/lib/python3/json.pyc", "/usr/lib/python3/email.pyc",
               "/usr/lib/python3/removed.pyc"]  # 3 of 4 are files of the new tree
    unrelated = ["/usr/sbin/nginx", "/etc/nginx/nginx.conf", "/etc/hostname",
                 "/usr/lib/nginx/a.so", "/usr/lib/nginx/b.so"]  # 1 of 5
    _host_profile(tmp_path, DIGEST_N, related, mtime=1_000)
    _host_profile(tmp_path, DIGEST_OTHER, unrelated, mtime=2_000)  # newer, but unrelated
    chosen = borrow_profile(tmp_path, tree, DIGEST_NEW)
    assert chosen is not None
    assert (chosen.source, chosen.name) == ("borrowed", DIGEST_N)
    assert chosen.profile.paths == related
    by_auto = locate_profile("auto", os.fspath(tmp_path / "no.ocix"), tmp_path, DIGEST_NEW,
                             tree=tree)
    assert by_auto == chosen
    (tmp_path / "profiles" / f"{DIGEST_N[3:]}.profile").unlink()
    assert borrow_profile(tmp_path, tree, DIGEST_NEW) is None  # the unrelated one: never


def test_an_own_profile_wins_and_ties_go_to_the_most_recent(tmp_path: Path) -> None:
    tree = _tree(*NEW_TREE)
    _host_profile(tmp_path, DIGEST_N, NEW_TREE[:2], mtime=1_000)
    _host_profile(tmp_path, DIGEST_OTHER, NEW_TREE[2:4], mtime=3_000)
    chosen = borrow_profile(tmp_path, tree, DIGEST_NEW)
    assert chosen is not None and chosen.name == DIGEST_OTHER
    _host_profile(tmp_path, DIGEST_NEW, NEW_TREE[4:], mtime=500)  # the image's own
    own = locate_profile("auto", os.fspath(tmp_path / "no.ocix"), tmp_path, DIGEST_NEW,
                         tree=tree)
    assert own is not None and (own.source, own.profile.paths) == ("host", NEW_TREE[4:])
    assert locate_profile("none", "x", tmp_path, DIGEST_NEW, tree=tree) is None


def test_broken_huge_and_foreign_files_in_the_profiles_directory_are_skipped(
    tmp_path: Path,
) -> None:
    tree = _tree(*NEW_TREE)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / f"{'4' * 64}.profile").write_bytes(b"\xa1not cbor")
    # A valid profile of this very tree, but over the size limit: never read.
    repeats = BORROW_MAX_BYTES // len(encode_profile(Profile(((NEW_TREE[0], 0),)))) + 1
    huge = Profile(tuple((path, n) for n in range(repeats) for path in NEW_TREE))
    assert len(encode_profile(huge)) > BORROW_MAX_BYTES
    (profiles / f"{'5' * 64}.profile").write_bytes(encode_profile(huge))
    (profiles / "notes.profile").write_bytes(encode_profile(Profile(((NEW_TREE[0], 0),))))
    os.symlink(profiles / "notes.profile", profiles / f"{'6' * 64}.profile")
    assert borrow_profile(tmp_path, tree, DIGEST_NEW) is None
    assert borrow_profile(tmp_path / "no-such-cache", tree, DIGEST_NEW) is None


# -- real mounts -------------------------------------------------------------------------


def _mounted_nothing_under(path: Path) -> bool:
    prefix = os.fsencode(path)
    with open("/proc/self/mounts", "rb") as mounts:
        return not any(line.split()[1].startswith(prefix) for line in mounts
                       if len(line.split()) > 1)


class Versions(NamedTuple):
    """Version N of an image, N+1 (one file upgraded, one added, one removed) and an
    unrelated image, all in one store."""

    store: Path
    n: Path
    next: Path
    other: Path


@pytest.fixture
def versions(tmp_path: Path) -> Versions:
    root_n = make_rootfs(tmp_path / "rootfs-n")
    root_next = tmp_path / "rootfs-next"
    subprocess.run(["cp", "-a", os.fspath(root_n), os.fspath(root_next)], check=True)
    (root_next / "etc/hostname").write_text("version N+1\n")  # upgraded
    (root_next / "usr/share/data/added.txt").write_text("a new package's file\n")
    (root_next / "usr/share/data/small-19.txt").unlink()  # removed
    unrelated = tmp_path / "rootfs-other"
    (unrelated / "srv").mkdir(parents=True)
    for i in range(5):
        (unrelated / "srv" / f"other-{i}.txt").write_text(f"unrelated {i}\n")
    (unrelated / "etc").mkdir()
    (unrelated / "etc/hostname").write_text("unrelated\n")
    store = tmp_path / "store"
    return Versions(store, build(root_n, store, tmp_path / "n.ocix"),
                    build(root_next, store, tmp_path / "next.ocix"),
                    build(unrelated, store, tmp_path / "other.ocix"))


OPENED = ["etc/hostname", "usr/share/data/small-03.txt", "usr/share/data/small-19.txt",
          "usr/bin/tool"]


def _run_version_n(versions: Versions, mounts: Mounts, mnt: Path, args: list[str]) -> Path:
    """Mount version N, open ``OPENED``, unmount; the host profile it left."""
    with mounts(versions.n, mnt, *args) as mount:
        for name in OPENED:
            (mount.mountpoint / name).read_bytes()
        assert mount.stats()["played_profile"] is None  # nothing to play, nothing to borrow
    cache = Path(args[args.index("--cache-dir") + 1])
    profile = cached_profile_path(cache, manifest_digest(versions.n.read_bytes()))
    assert profile.is_file()
    return profile


@needs_fuse
@pytest.mark.mount
def test_a_new_version_borrows_the_old_versions_profile_and_records_its_own(
    tmp_path: Path, versions: Versions, mounts: Mounts
) -> None:
    digest_n = manifest_digest(versions.n.read_bytes())
    digest_next = manifest_digest(versions.next.read_bytes())
    cache = tmp_path / "cache"
    with Nginx(versions.store, tmp_path / "nginx") as server:
        args = store_args([server.url], cache)
        _run_version_n(versions, mounts, tmp_path / "mnt", args)
        before = len(blob_requests(server))
        with mounts(versions.next, tmp_path / "mnt", *args) as mount:
            wait_for(lambda: (mount.stats()["prefetch"] or {}).get("finished") is True,
                     what="prefetch")
            played = mount.stats()["played_profile"]
            assert played == {
                "source": "borrowed", "name": digest_n,
                "description": f"borrowed from {digest_n}", "paths": 4, "in_tree": 3,
            }
            text = run_ocixfs("stats", os.fspath(mount.mountpoint)).stdout
            assert f"borrowed from {digest_n}: 3 of its 4 paths are files of this image" in text
            # Only the new hostname is fetched: small-03 and the tool are cached from N,
            # small-19 is not in this tree.
            new_hostname = blake3.blake3(b"version N+1\n").hexdigest()
            assert blob_requests(server)[before:] == [f"/blobs/blake3/{new_hostname}"]
            assert (mount.mountpoint / "etc/hostname").read_text() == "version N+1\n"
            (mount.mountpoint / "usr/share/data/added.txt").read_bytes()
        own = cached_profile_path(cache, digest_next)
        shown = json.loads(run_ocixfs("profile", "show", os.fspath(own), "--json").stdout)
        assert [path for path, _ in shown["entries"]] == [
            "/etc/hostname", "/usr/share/data/added.txt"]

        with mounts(versions.next, tmp_path / "mnt", *args) as mount:  # now it has its own
            played = mount.stats()["played_profile"]
            assert isinstance(played, dict)
            assert (played["source"], played["name"]) == ("host", digest_next)

        with mounts(versions.other, tmp_path / "mnt", *args) as mount:
            stats = mount.stats()
            assert stats["played_profile"] is None and stats["prefetch"] is None
            assert "played       no profile" in run_ocixfs(
                "stats", os.fspath(mount.mountpoint)).stdout

        other = store_args([server.url], cache, "--prefetch", "none")
        with mounts(versions.next, tmp_path / "mnt2", *other) as mount:
            assert mount.stats()["played_profile"] is None
    assert not is_mounted(tmp_path / "mnt") and _mounted_nothing_under(tmp_path)


@needs_fuse
@pytest.mark.mount
def test_a_borrowed_profile_uses_packs_only_made_for_its_plan_on_this_image(
    tmp_path: Path, versions: Versions, mounts: Mounts
) -> None:
    """Version N's packs carry N's plan and are never asked for; packs of the borrowed
    profile played on N+1 are (a pack set is named by the blobs it carries)."""
    with Nginx(versions.store, tmp_path / "nginx") as server:
        profile_n = _run_version_n(versions, mounts, tmp_path / "mnt",
                                   store_args([server.url], tmp_path / "cache-n"))
        run_ocixfs("profile", "pack", os.fspath(profile_n), "--image", os.fspath(versions.n),
                   "--store", os.fspath(versions.store))
        for attempt, pack_next in enumerate((False, True)):
            if pack_next:
                run_ocixfs("profile", "pack", os.fspath(profile_n), "--image",
                           os.fspath(versions.next), "--store", os.fspath(versions.store))
            cache = tmp_path / f"cache-{attempt}"  # N's profile, none of its blobs
            (cache / "profiles").mkdir(parents=True)
            shutil.copy(profile_n, cache / "profiles" / profile_n.name)
            with mounts(versions.next, tmp_path / "mnt",
                        *store_args([server.url], cache)) as mount:
                wait_for(lambda: (mount.stats()["prefetch"] or {}).get("finished") is True,
                         what="prefetch")
                stats = mount.stats()
                assert (stats["played_profile"] or {}).get("source") == "borrowed"
                packs = (stats["prefetch"] or {})["packs"]
                assert packs["parts_found"] == (1 if pack_next else 0)
                assert packs["blobs_delivered"] == (3 if pack_next else 0)
                assert (mount.mountpoint / "etc/hostname").read_text() == "version N+1\n"
    assert _mounted_nothing_under(tmp_path)


def test_borrowing_reads_no_more_than_its_total_bytes(tmp_path: Path) -> None:
    """The look at host profiles is bounded in bytes, not only in count: older profiles
    beyond ``BORROW_TOTAL_BYTES`` are not read, even the best match."""
    tree = _tree(*NEW_TREE)
    _host_profile(tmp_path, DIGEST_N, NEW_TREE[:4], mtime=1_000)  # the best, but oldest
    assert borrow_profile(tmp_path, tree, DIGEST_NEW) is not None
    profiles = tmp_path / "profiles"
    filler = Profile(tuple((f"/nowhere/{n:07d}", n) for n in range(20_000)))
    data = encode_profile(filler)
    for index in range(BORROW_TOTAL_BYTES // len(data) + 1):  # newer, unrelated, large
        path = profiles / f"{index + 1:064x}.profile"
        path.write_bytes(data)
        os.utime(path, (2_000 + index, 2_000 + index))
    assert borrow_profile(tmp_path, tree, DIGEST_NEW) is None
