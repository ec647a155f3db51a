"""Deployment: mount(8) and fstab through the mount helper, systemd units, LXC containers.

These run the real tools a deployment uses: ``mount -t fuse.ocixfs``/``umount`` (mount(8)
finds the helper at /sbin/mount.fuse.ocixfs, which scripts/install links; the fixture below
links it for the test if needed and puts things back after), ``systemd-analyze verify`` on
the unit files, and ``lxc-execute`` starting a container whose rootfs is an ocixfs mount
with a writable overlay. Teardown always unmounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount, force_unmount, is_mounted, needs_fuse, run_ocixfs, wait_for
from tests.nginx import Nginx
from tests.test_mount import build, make_rootfs

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SBIN_HELPER = Path("/sbin/mount.fuse.ocixfs")


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(image.ocix, store) built from the small test rootfs."""
    root = make_rootfs(tmp_path / "rootfs")
    store = tmp_path / "store"
    yield build(root, store, tmp_path / "image.ocix"), store


@pytest.fixture
def server(tmp_path: Path, image: tuple[Path, Path]) -> Iterator[Nginx]:
    with Nginx(image[1], tmp_path / "nginx") as nginx:
        yield nginx


@pytest.fixture
def mount_helper() -> Iterator[Path]:
    """/sbin/mount.fuse.ocixfs running this checkout's helper, as scripts/install links it.

    A link this fixture makes or re-points is put back as it was afterwards.
    """
    helper = BIN / "mount.fuse.ocixfs"
    if not helper.is_file():
        pytest.skip(f"{helper} is missing: the package is not installed (scripts/install)")
    if SBIN_HELPER.exists() and SBIN_HELPER.resolve() == helper.resolve():
        yield SBIN_HELPER
        return
    if SBIN_HELPER.exists() and not SBIN_HELPER.is_symlink():
        pytest.skip(f"{SBIN_HELPER} is a file this test will not replace")
    previous = os.readlink(SBIN_HELPER) if SBIN_HELPER.is_symlink() else None
    _replace_link(SBIN_HELPER, os.fspath(helper))
    try:
        yield SBIN_HELPER
    finally:
        if previous is None:
            SBIN_HELPER.unlink(missing_ok=True)
        else:
            _replace_link(SBIN_HELPER, previous)


def _replace_link(link: Path, target: str) -> None:
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)


def _mount_entry(mountpoint: Path) -> tuple[str, set[str]]:
    """(fstype, options) of the mount at ``mountpoint``."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == os.fspath(mountpoint):
                return fields[2], set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def _daemon_pid(mountpoint: Path) -> int:
    stats = json.loads(run_ocixfs("stats", os.fspath(mountpoint), "--json").stdout)
    return int(stats["pid"])


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def _run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


# -- mount(8) and fstab -------------------------------------------------------------------------


@needs_fuse
@pytest.mark.mount
def test_mount_t_fuse_ocixfs_and_umount(
    tmp_path: Path, image: tuple[Path, Path], server: Nginx, mount_helper: Path
) -> None:
    ocix, _ = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = f"store={server.url},cache={tmp_path / 'cache'},_netdev,nofail,noauto,x-test.a=b"
    try:
        result = _run("mount", "-t", "fuse.ocixfs", os.fspath(ocix), os.fspath(mnt), "-o", options)
        assert result.returncode == 0, result.stderr
        fstype, flags = _mount_entry(mnt)
        assert fstype == "fuse.ocixfs"
        assert {"ro", "nosuid", "nodev"} <= flags
        assert (mnt / "etc/hostname").read_text() == "ocixfs-test-0\n"
        assert any("/blobs/" in path for path in server.requests())
        pid = _daemon_pid(mnt)
        result = _run("umount", os.fspath(mnt))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        wait_for(lambda: _gone(pid), what="the daemon to exit after umount")
    finally:
        force_unmount(mnt)


@needs_fuse
@pytest.mark.mount
def test_fstab_line_mounts_with_mount_T(
    tmp_path: Path, image: tuple[Path, Path], server: Nginx, mount_helper: Path
) -> None:
    ocix, _ = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# an alternative fstab, as mount -T reads it\n"
        f"{ocix} {mnt} fuse.ocixfs store={server.url},cache={tmp_path / 'cache'},"
        "x-systemd.requires=network-online.target,_netdev,noauto,nofail,defaults 0 0\n"
    )
    try:
        result = _run("mount", "-T", os.fspath(fstab), os.fspath(mnt))
        assert result.returncode == 0, result.stderr
        assert _mount_entry(mnt)[0] == "fuse.ocixfs"
        assert os.path.islink(mnt / "usr/share/data/relative-link")
        assert (mnt / "usr/share/data/shared.txt").read_text().startswith("shared by every")
        result = _run("umount", os.fspath(mnt))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


@needs_fuse
@pytest.mark.mount
def test_allow_suid_opts_in_through_mount(
    tmp_path: Path, image: tuple[Path, Path], server: Nginx, mount_helper: Path
) -> None:
    """mount(8) swallows ``suid``/``dev``; the helper's ``allow_suid``/``allow_dev`` get through."""
    ocix, _ = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = f"store={server.url},cache={tmp_path / 'cache'},allow_suid,allow_dev"
    try:
        result = _run("mount", "-t", "fuse.ocixfs", os.fspath(ocix), os.fspath(mnt), "-o", options)
        assert result.returncode == 0, result.stderr
        flags = _mount_entry(mnt)[1]
        assert "nosuid" not in flags and "nodev" not in flags
    finally:
        run_ocixfs("umount", os.fspath(mnt), check=False)
        force_unmount(mnt)


@needs_fuse
@pytest.mark.mount
def test_mount_failure_is_one_line_and_mounts_nothing(
    tmp_path: Path, image: tuple[Path, Path], mount_helper: Path
) -> None:
    ocix, store = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = _run(
        "mount", "-t", "fuse.ocixfs", os.fspath(ocix), os.fspath(mnt), "-o", f"store={store},bogus"
    )
    assert result.returncode != 0
    assert result.stderr.strip() == "ocixfs: unknown mount option 'bogus'"
    assert not is_mounted(mnt)


# -- systemd ------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["ocixfs@.service", "srv-root.mount"])
def test_systemd_unit_passes_verify(tmp_path: Path, unit: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # The units run the installed /usr/local/bin/ocixfs; verify checks that it exists, so
    # point them at this checkout's script instead.
    text = (REPO / "systemd" / unit).read_text()
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/ocixfs", os.fspath(BIN / "ocixfs")))
    result = _run(analyze, "verify", os.fspath(tmp_path / unit), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # bad settings are only warned about


# -- LXC ----------------------------------------------------------------------------------------


def _containers_unavailable() -> str | None:
    if shutil.which("lxc-execute") is None:
        return "lxc-execute is not installed (Debian package lxc; scripts/install installs it)"
    probe = _run("unshare", "--mount", "--pid", "--uts", "--ipc", "--net", "--fork", "true")
    if probe.returncode != 0:
        return f"this machine cannot create namespaces: {probe.stderr.strip()}"
    return None


_NO_CONTAINERS = _containers_unavailable()
needs_containers = pytest.mark.skipif(_NO_CONTAINERS is not None, reason=str(_NO_CONTAINERS))


def _lxc_execute(
    config_text: str, tmp_path: Path, name: str, script: str
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"{name}.conf"
    config.write_text(config_text)
    lxcpath = tmp_path / "lxcpath"
    lxcpath.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    command = ["lxc-execute", "-n", name, "-P", os.fspath(lxcpath), "-f", os.fspath(config)]
    try:  # (at DEBUG, LXC's log holds what the hooks print: ocixfs's one-line errors)
        result = _run(*command, "-o", os.fspath(log), "-l", "DEBUG", "--", "/bin/sh", "-c",
                      script)
    finally:
        _run("lxc-stop", "-k", "-n", name, "-P", os.fspath(lxcpath), timeout=30)
    if result.returncode != 0:
        result.stderr += log.read_text() if log.exists() else ""
    return result


@needs_fuse
@needs_containers
@pytest.mark.mount
def test_lxc_container_runs_on_ocixfs_with_overlay(
    tmp_path: Path, image: tuple[Path, Path], server: Nginx
) -> None:
    ocix, _ = image
    lower, first_upper, second_upper = (tmp_path / d for d in ("lower", "upper1", "upper2"))
    for directory in (lower, first_upper, second_upper):
        directory.mkdir()
    name = f"ocixfs-test-{os.getpid()}"

    def config(upper: Path) -> str:
        return run_ocixfs(
            "lxc-config", os.fspath(lower), os.fspath(upper), "--name", name,
            "--image", os.fspath(ocix), "--store", server.url,
            "--cache-dir", os.fspath(tmp_path / "cache"),
        ).stdout

    try:
        first = _lxc_execute(
            config(first_upper), tmp_path, name,
            'read h < /etc/hostname; echo "$h"; echo changed > /etc/hostname;'
            " echo new > /tmp/new; read h < /etc/hostname; echo $h",
        )
        assert first.returncode == 0, first.stderr
        assert first.stdout == "ocixfs-test-0\nchanged\n"
        assert (first_upper / "etc/hostname").read_text() == "changed\n"
        assert (first_upper / "tmp/new").read_text() == "new\n"
        assert not is_mounted(lower), "the post-stop hook unmounts the image"
        # A second container on the same image, with its own upper layer, sees the image as
        # built: the first container's writes never reached it.
        second = _lxc_execute(
            config(second_upper), tmp_path, name,
            'read h < /etc/hostname; echo "$h"; [ ! -e /tmp/new ] && echo clean',
        )
        assert second.returncode == 0, second.stderr
        assert second.stdout == "ocixfs-test-0\nclean\n"
    finally:
        force_unmount(lower)


def test_lxc_config_lines(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    text = run_ocixfs(
        "lxc-config", "/var/lib/lxc/c1/lower", "/var/lib/lxc/c1/upper", "--name", "c1",
        "--image", "https://example.org/debian.ocix", "--store", os.fspath(store),
        "--bridge", "lxcbr0", "--ocixfs", "/usr/local/bin/ocixfs",
    ).stdout
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert "lxc.rootfs.path = overlay:/var/lib/lxc/c1/lower:/var/lib/lxc/c1/upper" in settings
    assert "lxc.uts.name = c1" in settings
    assert "lxc.net.0.link = lxcbr0" in settings
    assert (
        "lxc.hook.pre-start = /usr/local/bin/ocixfs mount https://example.org/debian.ocix"
        f" /var/lib/lxc/c1/lower --store {store.as_uri()}/" in settings
    )
    assert "lxc.hook.post-stop = /usr/local/bin/ocixfs umount /var/lib/lxc/c1/lower" in settings
    assert all(" = " in line for line in settings)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/a:b", "/upper"], "cannot hold a ':'"),
        (["/same", "/same"], "must be different"),
        (["/lower", "/upper", "--store", "/tmp"], "only apply with --image"),
    ],
)
def test_lxc_config_refuses_bad_input(args: list[str], message: str) -> None:
    result = run_ocixfs("lxc-config", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


# -- Incus --------------------------------------------------------------------------------------


def _incus_image(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/incus-import on a test image whose /sbin/init waits for ever."""
    root = make_rootfs(tmp_path / "rootfs")
    init = root / "sbin" / "init"
    init.parent.mkdir()
    init.write_text("#!/bin/sh\n# wait for ever: nobody writes to the fifo\nread x < /etc/fifo\n")
    init.chmod(0o755)
    store = tmp_path / "store"
    ocix = build(root, store, tmp_path / "image.ocix")
    command = [os.fspath(REPO / "scripts" / "incus-import"), os.fspath(ocix), *args]
    command += ["--store", os.fspath(store), "--cache-dir", os.fspath(tmp_path / "cache")]
    return _run(*command, "--lazy", "/usr/share/data", "--mountpoint", os.fspath(tmp_path / "mnt"))


def _fs_reads(mount: Mount) -> int:
    fs = mount.stats()["fs"]
    assert isinstance(fs, dict)
    return int(fs["reads"])


def test_incus_image_tarball_layout(tmp_path: Path) -> None:
    """The unified image tarball Incus imports: metadata.yaml + rootfs/, owners, devices and
    xattrs kept, the --lazy subtree left as an empty directory."""
    import tarfile

    tarball = tmp_path / "image.tar"
    result = _incus_image(tmp_path, "test-alias", "--output", os.fspath(tarball))
    assert result.returncode == 0, result.stderr
    assert "disk source=" in result.stdout and "path=/usr/share/data readonly=true" in result.stdout
    with tarfile.open(tarball) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        metadata = tar.extractfile(members["metadata.yaml"])
        assert metadata is not None
        text = metadata.read().decode()
    assert f"architecture: {os.uname().machine}" in text
    assert "creation_date: " in text
    assert members["rootfs/etc/hostname"].isfile()
    assert members["rootfs/sbin/init"].mode & 0o111
    assert members["rootfs/usr/share/data"].isdir()
    assert not [name for name in members if name.startswith("rootfs/usr/share/data/")]
    tool = members["rootfs/usr/bin/tool"]
    assert "SCHILY.xattr.security.capability" in tool.pax_headers
    if os.geteuid() == 0:
        assert members["rootfs/home/user/file"].uid == 1000
        null = members["rootfs/dev/null"]
        assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)


@needs_fuse
@pytest.mark.mount
def test_incus_container_with_a_lazy_subtree(tmp_path: Path, incus_pool: str) -> None:
    alias = name = f"ocixfs-test-{os.getpid()}"
    result = _incus_image(tmp_path, alias)
    assert result.returncode == 0, result.stdout + result.stderr
    mnt = tmp_path / "mnt"
    mount = Mount(
        tmp_path / "image.ocix", mnt, "--store", os.fspath(tmp_path / "store"),
        "--cache-dir", os.fspath(tmp_path / "cache"),
    )
    try:
        with mount:
            try:
                _run_in_incus(alias, name, mnt, mount, incus_pool)
            finally:  # before unmounting: the container holds the mount through its disk
                _run("incus", "delete", "--force", name, timeout=60)
    finally:
        _run("incus", "image", "delete", alias, timeout=60)
        force_unmount(mnt)


def _run_in_incus(alias: str, name: str, mnt: Path, mount: Mount, pool: str) -> None:
    for command in (
        ["incus", "create", alias, name, "--quiet", "--storage", pool],
        ["incus", "config", "device", "add", name, "lazy", "disk",
         f"source={mnt}/usr/share/data", "path=/usr/share/data", "readonly=true"],
        ["incus", "start", name],
    ):
        step = _run(*command)
        assert step.returncode == 0, f"{command}: {step.stderr}"
    before = _fs_reads(mount)
    script = (
        "read h < /etc/hostname; echo $h; read s < /usr/share/data/shared.txt; echo $s;"
        " echo x > /tmp/x && echo wrote; echo x > /usr/share/data/new || echo read-only"
    )
    inside = _run("incus", "exec", name, "--", "/bin/sh", "-c", script)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == "ocixfs-test-0\nshared by every image\nwrote\nread-only\n"
    assert _fs_reads(mount) > before, "the container read through the ocixfs mount"


# -- scripts/demo -------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.mount
@pytest.mark.slow
def test_demo_runs_python_from_a_lazy_mount(tmp_path: Path) -> None:
    """The README's first command, end to end (with this host's python3 instead of
    mmdebstrap's Debian, which needs the package archive and minutes)."""
    work = tmp_path / "demo"
    env = {**os.environ, "OCIXFS_DEMO_DIR": os.fspath(work)}
    try:
        result = subprocess.run(
            [os.fspath(REPO / "scripts" / "demo"), "--no-install", "--host-python"],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "hello from Python" in result.stdout
        fetched = next(line for line in result.stdout.splitlines() if "fetched  " in line)
        share = float(fetched.split("(")[1].split()[0])
        assert 0 < share < 100, fetched
        assert not is_mounted(work / "mnt")
    finally:
        force_unmount(work / "mnt")
