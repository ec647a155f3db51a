"""``ocixfs extract`` into a directory another user controls: that user swaps the
directories extract creates for symlinks while it runs, to have root write and chmod
elsewhere. Extract must refuse such a destination before it writes anything."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from tests.attacker.conftest import (
    IN_CREATE,
    IN_ISDIR,
    Inotify,
    User,
    assert_one_line_error,
    build_image,
    ocixfs,
    owned_dir,
)


def swap_created_directory(ready: Callable[[], None], dest: str, name: str,
                           target: str) -> bool:
    """As soon as root creates ``dest/name`` (a directory, still empty), replace it by a
    symlink to ``target``. True if the swap was made."""
    watch = Inotify()
    watch.add(dest, IN_CREATE)
    ready()
    for _, mask, created in watch.events(timeout=60):
        if created == name and mask & IN_ISDIR:
            os.rmdir(os.path.join(dest, name))
            os.symlink(target, os.path.join(dest, name))
            return True
    return False


def test_extract_refuses_a_destination_another_user_owns(arena: Path, attacker: User) -> None:
    image = build_image(arena, {f"d/file{i}": b"planted by the image\n" for i in range(50)})
    victim = arena / "victim"
    victim.mkdir(mode=0o700)
    (victim / "precious").write_bytes(b"root's data\n")
    before = sorted(os.listdir(victim)), stat.S_IMODE(victim.stat().st_mode)
    dest = owned_dir(arena / "dest", attacker)

    racer = attacker.start(swap_created_directory, os.fspath(dest), "d", os.fspath(victim))
    try:
        result = ocixfs("extract", os.fspath(image), os.fspath(dest), "--store",
                        os.fspath(arena / "store"), "--cache-dir", os.fspath(arena / "cache"),
                        "--no-progress")
    finally:
        racer.kill()

    assert (sorted(os.listdir(victim)), stat.S_IMODE(victim.stat().st_mode)) == before
    assert_one_line_error(result, os.fspath(dest), f"uid {attacker.uid}")
    assert os.listdir(dest) == []


def test_extract_refuses_a_destination_below_a_directory_others_may_write(
        arena: Path, attacker: User) -> None:
    image = build_image(arena, {"d/file": b"content\n"})
    shared = arena / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky: anyone may rename what root creates here

    result = ocixfs("extract", os.fspath(image), os.fspath(shared / "rootfs"), "--store",
                    os.fspath(arena / "store"), "--cache-dir", os.fspath(arena / "cache"),
                    "--no-progress")

    assert_one_line_error(result, os.fspath(shared), "writable by others")
    assert os.listdir(shared) == []


def test_an_ordinary_user_extracts_into_their_own_directory(arena: Path, user: User) -> None:
    image = build_image(arena, {"d/file": b"content\n"})
    home = owned_dir(arena / "home", user)

    result = ocixfs("extract", os.fspath(image), os.fspath(home / "rootfs"), "--store",
                    os.fspath(arena / "store"), "--cache-dir", os.fspath(home / "cache"),
                    "--no-progress", as_user=user)

    assert result.returncode == 0, result.stderr
    assert (home / "rootfs" / "d" / "file").read_bytes() == b"content\n"
