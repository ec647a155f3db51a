"""``ocixfs build dir:SRC`` as root, SRC owned by another user who swaps a directory for
a symlink to root's secrets while the build walks: the build must never read through
it (it refuses), and nothing of the secret may reach the store or the image."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.attacker.conftest import (
    IN_ISDIR,
    IN_OPEN,
    Inotify,
    User,
    assert_one_line_error,
    ocixfs,
    owned_dir,
)

SECRET = b"root's secret key material\n"
FILES_PER_DIRECTORY = 1500


def fill_source(src: str) -> None:
    """As the attacker: two directories of many small files, so that walking one takes
    a while."""
    for directory in ("a", "b"):
        os.mkdir(os.path.join(src, directory))
        for index in range(FILES_PER_DIRECTORY):
            with open(os.path.join(src, directory, f"f{index}"), "wb") as f:
                f.write(b"%d\n" % index)


def swap_the_other_directory(ready: Callable[[], None], src: str, target: str) -> str:
    """Once root opens one of ``a`` and ``b`` (after listing ``src``), replace the
    other by a symlink to ``target``. Returns the name swapped."""
    watch = Inotify()
    for name in ("a", "b"):
        watch.add(os.path.join(src, name), IN_OPEN | IN_ISDIR)
    ready()
    for path, _, _ in watch.events(timeout=60):
        other = "b" if path.endswith("/a") else "a"
        os.rename(os.path.join(src, other), os.path.join(src, f"{other}.moved"))
        os.symlink(target, os.path.join(src, other))
        return other
    return ""


def test_build_never_reads_through_a_directory_swapped_mid_walk(
        arena: Path, attacker: User) -> None:
    secrets = arena / "secrets"
    secrets.mkdir(mode=0o700)
    for index in range(5):
        (secrets / f"f{index}").write_bytes(SECRET)
    src = owned_dir(arena / "src", attacker)
    attacker.run(fill_source, os.fspath(src))
    store, image = arena / "store", arena / "image.ocix"

    racer = attacker.start(swap_the_other_directory, os.fspath(src), os.fspath(secrets))
    try:
        result = ocixfs("build", f"dir:{src}", "--store", os.fspath(store), "-o",
                        os.fspath(image), "--no-progress", "--format-version", "0")
        swapped = racer.result(30)
    finally:
        racer.kill()

    assert swapped, "the attacker never saw the build open a directory"
    stored = [path for path in store.rglob("*") if path.is_file()]
    assert not any(SECRET in path.read_bytes() for path in stored)
    assert_one_line_error(result, f"{src}/{swapped}", "changed while the build read it")
    assert not image.exists()
