"""The runtime directory (control sockets, daemon logs) and the files a mount writes:
another user may not own it, reach the sockets in it whatever the umask, or redirect a
recorded profile through a predictable temporary name."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.attacker.conftest import (
    IN_CREATE,
    Inotify,
    User,
    assert_one_line_error,
    build_image,
    ocixfs,
    owned_dir,
)
from tests.mounting import force_unmount, is_mounted, needs_fuse


@pytest.fixture
def fallback_runtime_dir(user: User) -> Iterator[Path]:
    """Where ``user``'s daemons would put their sockets without XDG_RUNTIME_DIR."""
    path = Path(f"/tmp/ocixfs-{user.uid}")
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def squat_and_watch(ready: Callable[[], None], path: str) -> list[str]:
    """As the attacker: make the victim's runtime directory, open to all, and report
    what the victim creates in it."""
    os.mkdir(path)
    os.chmod(path, 0o777)
    watch = Inotify()
    watch.add(path, IN_CREATE)
    ready()
    return [name for _, _, name in watch.events(timeout=8)]


def test_a_mount_refuses_a_runtime_directory_another_user_made(
        arena: Path, attacker: User, user: User, fallback_runtime_dir: Path) -> None:
    image = build_image(arena, {"etc/motd": b"hello\n"})
    home = owned_dir(arena / "home", user)
    owned_dir(home / "mnt", user)
    racer = attacker.start(squat_and_watch, os.fspath(fallback_runtime_dir))
    try:
        result = ocixfs("mount", os.fspath(image), os.fspath(home / "mnt"), "--store",
                        os.fspath(arena / "store"), "--cache-dir", os.fspath(home / "cache"),
                        as_user=user)
    finally:
        if is_mounted(home / "mnt"):
            force_unmount(home / "mnt")
    created = racer.result(30)

    assert created == []  # no socket or log of the user's daemon in the attacker's hands
    assert_one_line_error(result, "runtime directory", f"uid {attacker.uid}")


def ask_for_the_profile(path: str) -> str:
    """As the attacker: what the daemon behind ``path`` answers to ``profile``, or the
    error that kept us from asking."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b'{"cmd": "profile"}\n')
            return sock.recv(65536).decode()
    except OSError as exc:
        return f"refused: {exc.strerror}"


@needs_fuse
def test_the_control_socket_is_private_whatever_the_umask(arena: Path, attacker: User) -> None:
    image = build_image(arena, {"etc/motd": b"hello\n"})
    mnt = arena / "mnt"
    mnt.mkdir()
    result = ocixfs("mount", os.fspath(image), os.fspath(mnt), "--store",
                    os.fspath(arena / "store"), "--cache-dir", os.fspath(arena / "cache"),
                    umask=0)
    try:
        assert result.returncode == 0, result.stderr
        (mnt / "etc" / "motd").read_bytes()
        pid = json.loads(ocixfs("stats", os.fspath(mnt), "--json").stdout)["pid"]
        sockets = [path for path in Path("/run/ocixfs").glob("*.sock")
                   if _daemon_pid(path) == pid]
        assert len(sockets) == 1
        answer = attacker.run(ask_for_the_profile, os.fspath(sockets[0]))
        mode = sockets[0].stat().st_mode & 0o777
    finally:
        ocixfs("umount", os.fspath(mnt))
        force_unmount(mnt)

    assert answer.startswith("refused: "), answer
    assert mode == 0o600
    assert Path("/run/ocixfs").stat().st_mode & 0o077 == 0


def _daemon_pid(path: Path) -> int | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(os.fspath(path))
            sock.sendall(b'{"cmd": "pid"}\n')
            return int(json.loads(sock.recv(65536))["pid"])
    except (OSError, ValueError, KeyError):
        return None


def plant_temp_links(directory: str, name: str, pid: int, target: str) -> None:
    """As the attacker: a symlink at every temporary name the daemon ``pid`` could use."""
    os.symlink(target, os.path.join(directory, f".{name}.{pid}.tmp"))


@needs_fuse
def test_a_recorded_profile_is_never_written_through_a_planted_symlink(
        arena: Path, attacker: User) -> None:
    image = build_image(arena, {"etc/motd": b"hello\n"})
    drop = arena / "drop"  # a shared drop box: anyone may add files
    drop.mkdir()
    os.chmod(drop, 0o777)
    victim = arena / "root-config"
    victim.write_bytes(b"precious configuration\n")
    mnt = arena / "mnt"
    mnt.mkdir()
    profile = drop / "start.profile"
    result = ocixfs("mount", os.fspath(image), os.fspath(mnt), "--store",
                    os.fspath(arena / "store"), "--cache-dir", os.fspath(arena / "cache"),
                    "--record-profile", os.fspath(profile))
    try:
        assert result.returncode == 0, result.stderr
        pid = json.loads(ocixfs("stats", os.fspath(mnt), "--json").stdout)["pid"]
        attacker.run(plant_temp_links, os.fspath(drop), profile.name, pid, os.fspath(victim))
        assert (mnt / "etc" / "motd").read_bytes() == b"hello\n"
    finally:
        ocixfs("umount", os.fspath(mnt))
        force_unmount(mnt)

    assert victim.read_bytes() == b"precious configuration\n"
    assert profile.is_file() and not profile.is_symlink()
    shown = ocixfs("profile", "show", os.fspath(profile))
    assert "/etc/motd" in shown.stdout, shown.stderr
