"""A newcomer's rough edges of the ``ocixfs`` command (issue 11), each checked by running
the real command: real mounts, real servers, a real unprivileged user, real pipes.
"""

from __future__ import annotations

import importlib
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocixfs.mount.profile import Profile, encode_profile
from ocixfs.mount.runtime import mount_id
from tests.mounting import OCIXFS, Mounts, is_mounted, needs_fuse, run_ocixfs
from tests.reliabilitykit import Image, mount_args, write_image
from tests.servers import FaultServers

FILES = {"/etc/hostname": b"polish\n", "/data/a.bin": os.urandom(50_000)}

# What ``ocixfs mount`` imports on its way, imported before a child drops to ``nobody``:
# the interpreter's own library may be unreadable to that user (a pyenv under /root).
MOUNT_MODULES = (
    "concurrent.futures", "select", "tempfile", "ocixfs.cli", "ocixfs.cli.mount",
    "ocixfs.mount.daemon", "ocixfs.mount.session", "ocixfs.mount.fs", "ocixfs.mount.control",
    "ocixfs.fetch.reader", "ocixfs.store.remote", "ocixfs.store.spec", "ocixfs.image.loading",
    "ocixfs.image.tree", "ocixfs.mount.profile", "ocixfs.cache.sizes", "ocixfs.log",
)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return write_image(tmp_path / "image", FILES)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can read (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ocixfs-polish-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(args: list[str], env: dict[str, str], output: Path) -> int:
    """``ocixfs ARGS`` run in a forked child as ``nobody`` (stdout and stderr to
    ``output``); its exit status."""
    nobody = pwd.getpwnam("nobody")
    for name in MOUNT_MODULES:
        importlib.import_module(name)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 99
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 -- pytest's are captures
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            logging.getLogger("ocixfs").handlers.clear()  # main() sets it up again
            os.environ.update(env)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            from ocixfs.cli import main

            status = main(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_fuse
@pytest.mark.mount
def test_a_mount_that_the_kernel_refuses_is_one_line_and_leaves_nothing(
    shared_dir: Path,
) -> None:
    """``nobody`` mounting (``/dev/fuse`` is root's here, or, where it is open to all, a
    root-owned mountpoint makes fusermount3 refuse): one line, exit 1, no socket, no log,
    no mount. It used to print ``ExceptionGroup: Exceptions from Trio nursery`` and leave
    the control socket behind."""
    image = write_image(shared_dir / "image", FILES)
    for path in shared_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    mountpoint = shared_dir / "mnt"
    mountpoint.mkdir()  # root's: nobody may not mount on it
    runtime = shared_dir / "run"
    runtime.mkdir()
    os.chown(runtime, pwd.getpwnam("nobody").pw_uid, -1)
    env = {"XDG_RUNTIME_DIR": os.fspath(runtime), "XDG_CACHE_HOME": os.fspath(runtime / "c"),
           "HOME": os.fspath(runtime)}
    output = shared_dir / "output"
    status = run_as_nobody(
        ["mount", os.fspath(image.ocix), os.fspath(mountpoint), "--store", os.fspath(image.store),
         "--prefetch", "none"], env, output)
    said = output.read_text()
    assert status == 1, said
    assert said.startswith(f"ocixfs: {mountpoint}: cannot mount: ") and said.count("\n") == 1
    assert "Trio" not in said and "Traceback" not in said
    if os.stat("/dev/fuse").st_mode & 0o006 == 0:
        assert "/dev/fuse" in said
    sockets_and_logs = [path.name for path in (runtime / "ocixfs").glob(f"{mount_id(mountpoint)}*")]
    assert sockets_and_logs == [] and not is_mounted(mountpoint)


def test_version() -> None:
    from ocixfs import __version__

    assert run_ocixfs("--version").stdout == f"ocixfs {__version__}\n"


def _many_entries_profile(path: Path, count: int = 20_000) -> Path:
    entries = tuple((f"/usr/lib/python3/file-{n:06d}.py", n) for n in range(count))
    path.write_bytes(encode_profile(Profile(entries)))
    return path


@pytest.mark.parametrize("command", ["profile show", "inspect", "diff"])
def test_a_reader_that_stops_early_ends_any_command_quietly(
    tmp_path: Path, command: str
) -> None:
    """``ocixfs … | head``: no BrokenPipeError traceback, for every command (main() handles
    it once), and the shell's status for SIGPIPE."""
    profile = _many_entries_profile(tmp_path / "p.profile")
    old = write_image(tmp_path / "old", {f"/f{n}": b"old" for n in range(3000)})
    new = write_image(tmp_path / "new", {f"/f{n}": b"new" for n in range(3000)})
    args = {"profile show": ["profile", "show", os.fspath(profile)],
            "inspect": ["inspect", os.fspath(old.ocix)],
            "diff": ["diff", "--all", os.fspath(old.ocix), os.fspath(new.ocix)]}[command]
    with subprocess.Popen([*OCIXFS, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.readline()
        process.stdout.close()  # like head(1) after its lines
        stderr = process.stderr.read().decode()
        status = process.wait(timeout=60)
    assert stderr == "" and status == 141


def test_bad_digest_and_bad_profile_files_are_one_line(tmp_path: Path, image: Image) -> None:
    (tmp_path / "mnt").mkdir()
    for args in (["mount", os.fspath(image.ocix), os.fspath(tmp_path / "mnt"), "--digest", "abc"],
                 ["extract", os.fspath(image.ocix), os.fspath(tmp_path / "x"), "--digest", "b3:"
                  + "g" * 64]):
        result = run_ocixfs(*args, check=False)
        assert result.returncode == 2
        assert result.stderr.endswith(": not an image digest (b3: and 64 hex digits)\n")
        assert result.stderr.count("\n") == 1
    result = run_ocixfs("profile", "show", os.fspath(image.ocix), check=False)
    assert result.returncode == 1
    assert result.stderr == f"ocixfs: {image.ocix}: not an ocixfs profile\n"


@needs_fuse
@pytest.mark.mount
def test_a_non_empty_mountpoint_is_refused_unless_nonempty(
    tmp_path: Path, image: Image, mounts: Mounts
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    (mountpoint / "precious").write_text("hidden by a mount")
    args = mount_args(os.fspath(image.store), tmp_path / "cache")
    mounts(image.ocix, mountpoint)  # so that teardown unmounts it, should it mount after all
    result = run_ocixfs("mount", os.fspath(image.ocix), os.fspath(mountpoint), *args, check=False)
    assert result.returncode == 2 and not is_mounted(mountpoint)
    assert result.stderr == (f"ocixfs: {mountpoint}: not empty (the mount would hide its files; "
                             "-o nonempty to mount anyway)\n")
    with mounts(image.ocix, mountpoint, *args, "-o", "nonempty") as mount:
        assert (mount.mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
    assert (mountpoint / "precious").read_text() == "hidden by a mount"


def _refused_port() -> int:
    """A loopback port where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_manifest_is_one_line(tmp_path: Path) -> None:
    """It used to say two lines, the first about ``IMAGE.ocix.profile`` nobody asked for."""
    (tmp_path / "mnt").mkdir()
    url = f"http://127.0.0.1:{_refused_port()}/image.ocix"
    result = run_ocixfs("mount", url, os.fspath(tmp_path / "mnt"), "--cache-dir",
                        os.fspath(tmp_path / "cache"), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"ocixfs: {url}: ")
    assert "profile" not in result.stderr


@needs_fuse
@pytest.mark.mount
def test_a_store_that_refuses_connections_is_a_warning_and_cached_files_still_work(
    tmp_path: Path, image: Image, serve: FaultServers, mounts: Mounts
) -> None:
    server = serve(image.store)
    cache = tmp_path / "cache"
    with mounts(image.ocix, tmp_path / "warm", *mount_args(server.url, cache)) as m:
        assert (m.mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
    dead = f"http://127.0.0.1:{_refused_port()}"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_ocixfs("mount", os.fspath(image.ocix), os.fspath(mountpoint),
                        *mount_args(dead, cache), check=False)
    mount = mounts(image.ocix, mountpoint)
    assert result.returncode == 0 and is_mounted(mountpoint), result.stderr
    assert result.stderr.startswith(f"ocixfs: warning: store {dead} did not answer (")
    assert result.stderr.count("\n") == 1
    assert (mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]  # cached
    mount.stop()


@needs_fuse
@pytest.mark.mount
def test_a_store_that_never_answers_does_not_hold_up_a_warm_mount(
    tmp_path: Path, image: Image, serve: FaultServers, mounts: Mounts
) -> None:
    """The mount is ready before the look at the silent store gives up (2 s per step), so
    nothing is printed; the warning reaches the daemon's log once the look has ended."""
    server = serve(image.store)
    cache = tmp_path / "cache"
    with mounts(image.ocix, tmp_path / "warm", *mount_args(server.url, cache)) as m:
        assert (m.mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]
    with socket.socket() as silent:  # connections complete in the backlog, never answered
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = f"http://127.0.0.1:{silent.getsockname()[1]}"
        mountpoint, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
        mountpoint.mkdir()
        result = run_ocixfs("mount", os.fspath(image.ocix), os.fspath(mountpoint),
                            *mount_args(store, cache), "--log-file", os.fspath(log_file),
                            check=False)
        mount = mounts(image.ocix, mountpoint)
        assert result.returncode == 0 and is_mounted(mountpoint), result.stderr
        assert "did not answer" not in result.stderr
        assert (mountpoint / "etc/hostname").read_bytes() == FILES["/etc/hostname"]  # cached
        deadline = time.monotonic() + 30
        while f"store {store} did not answer" not in log_file.read_text():
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.1)
        mount.stop()
@needs_fuse
@pytest.mark.mount
def test_stats_text_and_the_daemon_log(tmp_path: Path, image: Image, mounts: Mounts) -> None:
    """``stats`` names the log; its lines are timestamped; a clean unmount removes a log of
    routine lines only, and keeps one that holds a warning."""
    args = ["--store", os.fspath(image.store), "--cache-dir", os.fspath(tmp_path / "cache")]
    mountpoint = tmp_path / "mnt"
    with mounts(image.ocix, mountpoint, *args) as mount:
        (mount.mountpoint / "data/a.bin").read_bytes()
        text = run_ocixfs("stats", os.fspath(mountpoint)).stdout
        log_file = Path(text.split("\nlog          ", 1)[1].split("\n", 1)[0])
        assert log_file.name == f"{mount_id(mountpoint)}.log"
        assert "local        1 of 2 files, 50.0 kB of 50.0 kB" in text
        assert re.search(r"\d\.\d{4}", text) is None, text  # no raw floats
        received = text.split("bytes_received_by_source:\n", 1)[1].split("\n", 1)[0]
        assert received.endswith(" 50.0 kB"), text
        logged = log_file.read_text().splitlines()
        assert logged and all(line[:4].isdigit() and " INFO " in line for line in logged)
    assert not log_file.exists()
    (image.store / "blobs" / "blake3" / image.hexes("/etc/hostname")[0]).unlink()
    with mounts(image.ocix, mountpoint, *args) as mount, pytest.raises(OSError):
        (mount.mountpoint / "etc/hostname").read_bytes()  # EIO, and a warning in the log
    assert log_file.exists() and " WARNING " in log_file.read_text()
    log_file.unlink()
