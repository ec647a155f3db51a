"""``ocixfs profile record`` and ``ocixfs build --profile-cmd``: commands run inside a real
image (a tree with the host's /bin/sh, cat and sleep and their libraries) on a private
mount, their profile written beside the manifest, and nothing left behind: no mount in any
namespace, no process of the run, no temporary directory, also after a timeout or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import OCIXFS, Mounts, needs_fuse, run_ocixfs, store_args, wait_for
from tests.test_mount import _copy_with_libs, build, make_rootfs

pytestmark = needs_fuse

SHELL_FILES = {"/bin/sh", "/usr/bin/dash"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a manifest, its store), built once from the test rootfs plus cat and sleep."""
    base = tmp_path_factory.mktemp("record-image")
    root = make_rootfs(base / "rootfs")
    for tool in ("cat", "sleep"):
        _copy_with_libs(tool, root)
    store = base / "store"
    return build(root, store, base / "built.ocix"), store


@pytest.fixture
def image(tmp_path: Path, built: tuple[Path, Path]) -> Path:
    """A fresh copy of the manifest (its profile goes beside it) in this test's directory."""
    return Path(shutil.copy(built[0], tmp_path / "app.ocix"))


@pytest.fixture
def temp(tmp_path: Path) -> Iterator[Path]:
    """The TMPDIR of the recording: it must be empty again afterwards."""
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    yield directory
    assert list(directory.iterdir()) == []


def record(image: Path | str, store: Path, temp: Path, *args: str,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cache = temp.parent / "cache"
    command = [*OCIXFS, "profile", "record", os.fspath(image),
               *store_args(os.fspath(store), cache), *args]
    return subprocess.run(command, capture_output=True, text=True, errors="replace",
                          timeout=timeout,
                          env=os.environ | {"TMPDIR": os.fspath(temp)})


def profile_paths(profile: Path) -> list[str]:
    shown = run_ocixfs("profile", "show", os.fspath(profile), "--json").stdout
    return [path for path, _ in json.loads(shown)["entries"]]


def left_behind(marker: str) -> list[str]:
    """Mounts (in any process's namespace) and live processes whose text holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            mounts = (proc / "mountinfo").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        found += [f"{proc.name}: {line}" for line in mounts.splitlines() if marker in line]
        if marker in cmdline and state != "Z":
            found.append(f"process {proc.name}: {cmdline}")
    return found


def running(cmdline: str) -> bool:
    """Whether a process runs exactly ``cmdline`` (words joined by spaces)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().rstrip(b"\0") == \
                    cmdline.replace(" ", "\0").encode():
                return True
        except OSError:
            continue
    return False


def nothing_left(temp: Path, image: Path) -> None:
    assert left_behind(os.fspath(temp)) == []
    assert left_behind(os.fspath(image)) == []


def test_the_profile_names_what_the_command_read_in_order_and_mount_plays_it(
    tmp_path: Path, image: Path, built: tuple[Path, Path], temp: Path, mounts: Mounts
) -> None:
    read = ["/etc/hostname", "/usr/share/data/small-03.txt", "/usr/share/data/small-07.txt"]
    result = record(image, built[1], temp, "--", "/usr/bin/cat", *read)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ocixfs-test-0\n")  # the command's output is the user's
    profile = Path(f"{image}.profile")
    paths = profile_paths(profile)
    assert result.stdout.endswith(f"{profile}: {len(paths)} files from 1 runs\n")
    assert paths[-len(read):] == read
    assert "/usr/bin/cat" in paths and "/usr/share/data/small-05.txt" not in paths
    nothing_left(temp, image)

    moved = tmp_path / "store-elsewhere"  # the mount may only have what it prefetched
    shutil.copytree(built[1], moved)
    args = store_args(os.fspath(moved), tmp_path / "fresh-cache", "--deadline", "2")
    with mounts(image, tmp_path / "mnt", *args) as mount:
        wait_for(lambda: (mount.stats()["prefetch"] or {}).get("finished") is True,
                 what="prefetch")
        shutil.rmtree(moved)
        for path in read:
            assert (mount.mountpoint / path[1:]).read_bytes() == \
                (built[0].parent / "rootfs" / path[1:]).read_bytes()
        with pytest.raises(OSError):
            (mount.mountpoint / "usr/share/data/small-05.txt").read_bytes()


def test_a_command_that_writes_works_on_the_overlay(
    image: Path, built: tuple[Path, Path], temp: Path
) -> None:
    script = "echo written > /tmp/f && cat /tmp/f /etc/hostname && echo pid $$ && " \
             "test -c /dev/null && test -d /proc/1"
    result = record(image, built[1], temp, "--command", script, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # --json: the command's stdout went to stderr
    assert "written\nocixfs-test-0\npid " in result.stderr
    assert summary["runs"] == [{"command": ["/bin/sh", "-c", script], "status": 0,
                                "timed_out": False, "files": summary["files"]}]
    paths = profile_paths(image.with_name("app.ocix.profile"))
    assert "/etc/hostname" in paths and "/tmp/f" not in paths
    assert not (built[0].parent / "rootfs" / "tmp" / "f").exists()
    nothing_left(temp, image)


def test_a_failing_command_yields_a_profile_unless_strict(
    image: Path, built: tuple[Path, Path], temp: Path
) -> None:
    failing = "cat /etc/hostname; exit 3"
    result = record(image, built[1], temp, "--command", failing)
    assert result.returncode == 0, result.stderr
    assert "exit status 3" in result.stderr
    profile = image.with_name("app.ocix.profile")
    assert "/etc/hostname" in profile_paths(profile)
    profile.unlink()

    strict = record(image, built[1], temp, "--command", failing, "--strict")
    assert strict.returncode == 1
    assert strict.stderr.strip().splitlines()[-1] == \
        "ocixfs: 1 of 1 runs failed (--strict): no profile written"
    assert not profile.exists()
    assert [p.name for p in image.parent.iterdir() if p.name.startswith(".")] == []
    nothing_left(temp, image)


def test_a_command_past_the_timeout_is_killed_with_what_it_started(
    image: Path, built: tuple[Path, Path], temp: Path
) -> None:
    started = time.monotonic()
    result = record(image, built[1], temp, "--timeout", "2", "--json",
                    "--command", "cat /etc/hostname; sleep 4711 & sleep 4712")
    assert time.monotonic() - started < 60
    assert result.returncode == 0, result.stderr
    assert "still running after 2 s; killed with everything it started" in result.stderr
    assert json.loads(result.stdout)["runs"][0]["timed_out"] is True
    assert "/etc/hostname" in profile_paths(image.with_name("app.ocix.profile"))
    assert left_behind("sleep 471") == []
    nothing_left(temp, image)


def test_ctrl_c_unmounts_everything_and_writes_no_profile(
    image: Path, built: tuple[Path, Path], temp: Path
) -> None:
    command = [*OCIXFS, "profile", "record", os.fspath(image),
               *store_args(os.fspath(built[1]), temp.parent / "cache"),
               "--command", "cat /etc/hostname; sleep 4713"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=os.environ | {"TMPDIR": os.fspath(temp)})
    try:
        wait_for(lambda: running("sleep 4713"), timeout=60, what="the command")
        assert left_behind(os.fspath(temp)) != []  # mounted, in the run's namespace only
        assert left_behind(os.fspath(temp))[0].split(":")[0] != str(os.getpid())
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "ocixfs: interrupted"
    assert not image.with_name("app.ocix.profile").exists()
    assert [p.name for p in image.parent.iterdir() if p.name.startswith(".")] == []
    assert left_behind("sleep 4713") == []
    nothing_left(temp, image)


def test_repeated_runs_of_several_commands_merge_into_one_profile(
    image: Path, built: tuple[Path, Path], temp: Path
) -> None:
    result = record(image, built[1], temp, "--repeat", "2", "--json",
                    "--command", "cat /usr/share/data/small-05.txt",
                    "--command", "cat /usr/share/data/small-06.txt >/dev/null",
                    "--", "/usr/bin/cat", "/etc/hostname")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [run["command"][-1] for run in summary["runs"]] == [
        "cat /usr/share/data/small-05.txt", "cat /usr/share/data/small-06.txt >/dev/null",
        "/etc/hostname"] * 2
    paths = profile_paths(image.with_name("app.ocix.profile"))
    assert len(paths) == len(set(paths)) == summary["files"]
    read = {"/usr/share/data/small-05.txt", "/usr/share/data/small-06.txt", "/etc/hostname"}
    assert read <= set(paths)
    assert paths[-1] in read  # the files read come after the programs that read them
    nothing_left(temp, image)


def test_build_profile_cmd_writes_the_profile_beside_the_image(tmp_path: Path,
                                                               built: tuple[Path, Path]) -> None:
    source = built[0].parent / "rootfs"
    output = tmp_path / "new.ocix"
    result = run_ocixfs("build", f"dir:{source}", "--store", os.fspath(tmp_path / "store"),
                        "-o", os.fspath(output), "--json",
                        "--profile-cmd", "cat /usr/share/data/small-09.txt >/dev/null")
    summary = json.loads(result.stdout)
    profile = tmp_path / "new.ocix.profile"
    assert summary["profile"]["profile"] == os.fspath(profile)
    assert profile_paths(profile)[-1] == "/usr/share/data/small-09.txt"
    packs = summary["profile"]["packs"]  # the profile's files, one request away
    assert packs["blobs"] >= 1 and len(packs["parts"]) == 1
    assert (tmp_path / "store" / packs["parts"][0]["name"]).is_file()

    failed = run_ocixfs("build", f"dir:{source}", "--store", os.fspath(tmp_path / "store"),
                        "-o", os.fspath(tmp_path / "bad.ocix"),
                        "--profile-cmd", "exit 5", check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("ocixfs: 1 of 1 runs failed")
    assert (tmp_path / "bad.ocix").exists() and not (tmp_path / "bad.ocix.profile").exists()


@pytest.mark.parametrize(("args", "message"), [
    ([], "ocixfs: profile record: no command (give '-- CMD [ARG ...]' or --command LINE)"),
    (["-o", "{tmp}/missing/x.profile", "--", "/bin/true"],
     "ocixfs: {tmp}/missing/x.profile: cannot write there: No such file or directory"),
    (["--repeat", "0", "--", "/bin/true"], "ocixfs: --repeat must be at least 1"),
])
def test_bad_input_is_one_line_and_runs_nothing(
    tmp_path: Path, image: Path, built: tuple[Path, Path], temp: Path, args: list[str],
    message: str
) -> None:
    result = record(image, built[1], temp, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert result.stderr == message.format(tmp=tmp_path) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.ocix", "tmpdir"]


def test_a_missing_image_or_a_url_without_output_is_one_line(
    tmp_path: Path, built: tuple[Path, Path], temp: Path
) -> None:
    missing = record(tmp_path / "nope.ocix", built[1], temp, "--", "/bin/true")
    assert missing.returncode in (1, 2)
    assert missing.stderr.count("\n") == 1 and "nope.ocix" in missing.stderr
    assert "Traceback" not in missing.stderr
    url = record("http://127.0.0.1:9/app.ocix", built[1], temp, "--", "/bin/true")
    assert url.returncode == 2
    assert url.stderr == ("ocixfs: http://127.0.0.1:9/app.ocix: a URL; name the profile to "
                          "write with -o PROFILE\n")
