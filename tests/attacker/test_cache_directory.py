"""A cache directory another user controls. Whoever can plant entries in a cache can
make root delete files elsewhere (the clean-up of abandoned fills in ``tmp/``),
overwrite a file (the ``usage`` counter), serve any file's content as a verified blob,
or have ``ocixfs cache fsck`` remove what a symlinked ``blobs/`` leads to. ocixfs must
refuse such a cache, and never follow a symlink inside its own cache."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from tests.attacker.conftest import User, assert_one_line_error, build_image, ocixfs, owned_dir
from tests.mounting import force_unmount, is_mounted, needs_fuse

SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"
OLD = 946684800  # 2000-01-01: older than any leftover fill may live


def plant_cache(cache: str, blob_hex: str, secret: str, victim_dir: str,
                victim_file: str) -> None:
    """As the attacker: a cache whose ``tmp/`` leads to root's directory, whose counter is
    root's file and whose blob for ``blob_hex`` is root's secret."""
    os.mkdir(os.path.join(cache, "blobs"))
    os.mkdir(os.path.join(cache, "blobs", blob_hex[:2]))
    os.symlink(secret, os.path.join(cache, "blobs", blob_hex[:2], blob_hex))
    os.symlink(victim_dir, os.path.join(cache, "tmp"))
    os.symlink(victim_file, os.path.join(cache, "usage"))


@needs_fuse
def test_mount_refuses_a_cache_another_user_owns(arena: Path, attacker: User) -> None:
    content = b"x" * len(SECRET)  # same size: the old code checked nothing else
    image = build_image(arena, {"etc/motd": content})
    secret = arena / "shadow"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    victim_dir = arena / "root-data"
    victim_dir.mkdir(mode=0o700)
    (victim_dir / "archive.tar").write_bytes(b"root's archive\n")
    os.utime(victim_dir / "archive.tar", (OLD, OLD))
    victim_file = arena / "root-config"
    victim_file.write_bytes(b"precious configuration\n")
    cache = owned_dir(arena / "cache", attacker)
    attacker.run(plant_cache, os.fspath(cache), blake3.blake3(content).hexdigest(),
                 os.fspath(secret), os.fspath(victim_dir), os.fspath(victim_file))
    mnt = arena / "mnt"
    mnt.mkdir()

    result = ocixfs("mount", os.fspath(image), os.fspath(mnt), "--store",
                    os.fspath(arena / "store"), "--cache-dir", os.fspath(cache))
    try:
        served = (mnt / "etc" / "motd").read_bytes() if is_mounted(mnt) else None
    finally:
        if is_mounted(mnt):
            ocixfs("umount", os.fspath(mnt))
            force_unmount(mnt)

    assert served != SECRET
    assert (victim_dir / "archive.tar").read_bytes() == b"root's archive\n"
    assert victim_file.read_bytes() == b"precious configuration\n"
    assert_one_line_error(result, os.fspath(cache), f"uid {attacker.uid}")
    assert not is_mounted(mnt)


def symlinked_blobs(cache: str, target: str) -> None:
    os.symlink(target, os.path.join(cache, "blobs"))


@pytest.mark.parametrize("owner", ["attacker", "root"])
def test_fsck_never_cleans_what_a_symlinked_blobs_directory_leads_to(
        arena: Path, attacker: User, owner: str) -> None:
    """Owned by the attacker, the cache is refused; owned by root (a leftover of a cache
    that was once writable by others), its ``blobs`` symlink is refused all the same."""
    victim = arena / "root-data"
    victim.mkdir(mode=0o700)
    (victim / "notes.txt").write_bytes(b"root's notes\n")
    if owner == "attacker":
        cache = owned_dir(arena / "cache", attacker)
        attacker.run(symlinked_blobs, os.fspath(cache), os.fspath(victim))
    else:
        cache = arena / "cache"
        cache.mkdir(mode=0o700)
        symlinked_blobs(os.fspath(cache), os.fspath(victim))

    result = ocixfs("cache", "fsck", "--cache-dir", os.fspath(cache))

    assert (victim / "notes.txt").read_bytes() == b"root's notes\n"
    assert_one_line_error(result, os.fspath(cache))


def test_a_symlink_in_place_of_a_blob_is_never_served(arena: Path) -> None:
    """Defence in depth in root's own cache: a symlink where a blob belongs is not
    followed; the blob is fetched again and replaces it."""
    content = b"y" * len(SECRET)
    image = build_image(arena, {"etc/motd": content})
    secret = arena / "shadow"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    cache = arena / "cache"
    common = ["--store", os.fspath(arena / "store"), "--cache-dir", os.fspath(cache),
              "--no-progress"]
    first = ocixfs("extract", os.fspath(image), os.fspath(arena / "first"), *common)
    assert first.returncode == 0, first.stderr
    hexdigest = blake3.blake3(content).hexdigest()
    blob = cache / "blobs" / hexdigest[:2] / hexdigest
    blob.unlink()
    blob.symlink_to(secret)

    second = ocixfs("extract", os.fspath(image), os.fspath(arena / "second"), *common)

    assert second.returncode == 0, second.stderr
    assert (arena / "second" / "etc" / "motd").read_bytes() == content
    assert blob.is_file() and not blob.is_symlink()
