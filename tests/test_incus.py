"""Lazy Incus containers (``ocixfs incus``): real Incus, a real Debian image with systemd.

The fast tests check the pieces (idmap parsing, the raw.lxc block, ``-o uidshift``). The
slow one installs Incus if it is missing (``incus-base`` from bookworm-backports; it skips,
saying why, only when that install fails), starts the daemon if none answers (its proxy
pointed at a closed loopback port, so nothing leaves this host), creates a ``dir`` pool if
there is none, builds a Debian minbase + systemd image (mmdebstrap, cached under
``/var/tmp/ocixfs-test-images``), serves it with nginx on loopback and runs privileged and
unprivileged system containers from it. Teardown deletes the instances it made and
unmounts what is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ocixfs.mount.incus import (
    RUN_DIR,
    HookContext,
    HookError,
    IdShift,
    ImageSpec,
    idshift_from_lxc_config,
    idshift_from_volatile,
    merge_raw_lxc,
    pre_start,
    raw_lxc,
)
from ocixfs.mount.mounts import mount_type
from ocixfs.mount.stacking import kernel_can_stack
from tests.mounting import Mount, force_unmount, is_mounted, needs_fuse, run_ocixfs, wait_for
from tests.nginx import Nginx
from tests.test_mount import build, make_rootfs

IMAGE_CACHE = Path(os.environ.get("OCIXFS_TEST_IMAGES", "/var/tmp/ocixfs-test-images"))


def _run(*command: str, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


# -- the pieces ---------------------------------------------------------------------------------

VOLATILE = json.dumps([
    {"Isuid": True, "Isgid": False, "Hostid": 1000000, "Nsid": 0, "Maprange": 1000000000},
    {"Isuid": False, "Isgid": True, "Hostid": 2000000, "Nsid": 0, "Maprange": 1000000000},
])


def test_idshift_from_incus_and_lxc_config() -> None:
    assert idshift_from_volatile(VOLATILE) == IdShift(1000000, 2000000)
    assert idshift_from_volatile("[]").privileged
    assert idshift_from_volatile(None).privileged
    conf = "lxc.uts.name = c1\nlxc.idmap = u 0 1000000 65536\nlxc.idmap = g 0 3000000 65536\n"
    assert idshift_from_lxc_config(conf) == IdShift(1000000, 3000000)
    assert idshift_from_lxc_config("lxc.uts.name = c1\n").privileged


def test_raw_lxc_block_and_merge() -> None:
    block = raw_lxc(lower=Path("/run/l"), upper=Path("/var/lib/incus/c/rootfs"),
                    shift=IdShift(1000000, 1000000), hook=["/bin/ocixfs", "incus", "hook"],
                    hook_args=["img.ocix", "--lower", "/run/l"])
    lines = block.splitlines()
    assert "lxc.rootfs.path = overlay:/run/l:/var/lib/incus/c/rootfs" in lines
    assert "lxc.rootfs.options = userxattr" in lines
    assert "lxc.hook.pre-start = /bin/ocixfs incus hook pre-start img.ocix --lower /run/l" in lines
    assert "lxc.hook.post-stop = /bin/ocixfs incus hook post-stop img.ocix --lower /run/l" in lines
    privileged = raw_lxc(lower=Path("/run/l"), upper=Path("/u"), shift=IdShift(),
                         hook=["ocixfs"], hook_args=[])
    assert "lxc.rootfs.options =" in privileged.splitlines()
    # the user's own lines stay; a previous block is replaced, not repeated
    merged = merge_raw_lxc("lxc.cap.drop = sys_time\n", block)
    again = merge_raw_lxc(merged, privileged)
    assert again.startswith("lxc.cap.drop = sys_time\n")
    assert again.count("lxc.rootfs.path") == 1 and "userxattr" not in again
    with pytest.raises(Exception, match="':'"):
        raw_lxc(lower=Path("/a:b"), upper=Path("/u"), shift=IdShift(), hook=[], hook_args=[])


def test_image_key_differs_per_settings_and_shift() -> None:
    spec = ImageSpec(image="/srv/debian.ocix", stores=("https://a/",))
    assert spec.key(IdShift()).startswith("debian-") and spec.key(IdShift()).endswith("-0-0")
    assert spec.key(IdShift()) != spec.key(IdShift(1000000, 1000000))
    assert spec.key(IdShift()) != ImageSpec(image="/srv/debian.ocix").key(IdShift())


def _context(tmp_path: Path, rootfs: Path, conf: str) -> HookContext:
    return HookContext(name="c1", rootfs=rootfs, config_text=conf,
                       log_file=tmp_path / "lxc.log", monitor=(os.getpid(), 0))


def test_hook_refuses_a_copied_or_reconfigured_instance(tmp_path: Path) -> None:
    spec = ImageSpec(image="/nowhere.ocix")
    rootfs = tmp_path / "c1" / "rootfs"
    with pytest.raises(HookError, match="renamed or copied"):
        pre_start(_context(tmp_path, rootfs, ""), spec=spec, lower=tmp_path / "l",
                  upper=tmp_path / "other" / "rootfs", shift=IdShift(), ocixfs=["false"],
                  run_dir=tmp_path / "run")
    ctx = _context(tmp_path, rootfs, "lxc.idmap = u 0 1000000 65536\nlxc.idmap = g 0 1000000 9\n")
    with pytest.raises(HookError, match="security.privileged or idmap changed"):
        pre_start(ctx, spec=spec, lower=tmp_path / "l", upper=rootfs, shift=IdShift(),
                  ocixfs=["false"], run_dir=tmp_path / "run")
    ctx.report("a message for incus info --show-log")
    assert "ERROR    ocixfs - a message" in (tmp_path / "lxc.log").read_text()


@needs_fuse
@pytest.mark.mount
def test_mount_uidshift_shifts_every_owner(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    store = tmp_path / "store"
    ocix = build(root, store, tmp_path / "image.ocix")
    mnt = tmp_path / "mnt"
    with Mount(ocix, mnt, "--store", os.fspath(store), "--cache-dir", os.fspath(tmp_path / "c"),
               "-o", "uidshift=100000,gidshift=200000"):
        assert (os.stat(mnt / "etc").st_uid, os.stat(mnt / "etc").st_gid) == (100000, 200000)
        owned = os.stat(mnt / "home/user/file")
        assert (owned.st_uid, owned.st_gid) == (101000, 201001)
    bad = run_ocixfs("mount", os.fspath(ocix), os.fspath(mnt), "--store", os.fspath(store),
                     "-o", "uidshift=-1", check=False)
    assert bad.returncode == 2 and "uidshift=-1" in bad.stderr


# -- real Incus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(image.ocix, store, blob bytes) of Debian bookworm minbase + systemd-sysv."""
    tar = IMAGE_CACHE / "bookworm-minbase-systemd.tar"
    if not tar.exists():
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        partial = tar.with_suffix(".partial")
        made = _run("mmdebstrap", "--quiet", "--format=tar", "--variant=minbase",
                    "--include=systemd-sysv", "bookworm", os.fspath(partial), timeout=900)
        assert made.returncode == 0, f"mmdebstrap: {made.stderr[-2000:]}"
        partial.rename(tar)
    work = tmp_path_factory.mktemp("debian")
    ocix, store = work / "debian.ocix", work / "store"
    run_ocixfs("build", f"tar:{tar}", "--store", os.fspath(store), "--output", os.fspath(ocix),
               "--no-progress", timeout=600)
    summary = json.loads(run_ocixfs("inspect", os.fspath(ocix), "--json").stdout)["summary"]
    return ocix, store, int(summary["blob_bytes"])


def _exec(name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return _run("incus", "exec", name, "--", "/bin/sh", "-c", script, timeout=timeout)


def _booted(name: str) -> str:
    """systemd's state once it has finished starting (running, degraded, …)."""
    deadline = time.monotonic() + 120
    while True:
        state = _exec(name, "systemctl is-system-running --wait", timeout=130).stdout.strip()
        if state not in ("", "initializing", "starting") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _incus_mounts(key_part: str) -> list[Path]:
    mounts = RUN_DIR / "mounts"
    return [p for p in sorted(mounts.iterdir()) if key_part in p.name and is_mounted(p)] \
        if mounts.is_dir() else []


def _stats(lower: Path) -> dict[str, int]:
    data = json.loads(run_ocixfs("stats", os.fspath(lower), "--json").stdout)
    return {"pid": int(data["pid"]), **{k: int(v) for k, v in data["reader"].items()
                                        if isinstance(v, int)}}


@needs_fuse
@pytest.mark.mount
@pytest.mark.slow
def test_incus_system_containers_on_a_lazy_root(
    tmp_path: Path, incus_pool: str, debian_image: tuple[Path, Path, int]
) -> None:
    ocix, store, image_bytes = debian_image
    prefix = f"ocixfs-t{os.getpid()}"
    names = {k: f"{prefix}-{k}" for k in ("priv", "unpriv", "unpriv2", "priv2")}
    cache = tmp_path / "cache"
    with Nginx(store, tmp_path / "nginx") as nginx:
        common = [os.fspath(ocix), "--store", nginx.url, "--cache-dir", os.fspath(cache),
                  "-s", incus_pool]
        found: dict[str, str] = {}
        try:
            _run_instances(names, common, found, image_bytes)
        finally:
            for name in names.values():
                _run("incus", "delete", "--force", name, timeout=120)
            if "key" in found:
                key = found["key"]
                with contextlib.suppress(AssertionError):
                    wait_for(lambda: not _incus_mounts(key), timeout=30, what="post-stop hooks")
                for lower in _incus_mounts(key):
                    force_unmount(lower)


def _lower_of(name: str) -> Path:
    """The image mount an instance's raw.lxc names (lxc.rootfs.path = overlay:LOWER:UPPER)."""
    raw = _run("incus", "config", "get", name, "raw.lxc").stdout
    line = next(x for x in raw.splitlines() if x.startswith("lxc.rootfs.path = overlay:"))
    return Path(line.split(":")[1])


def _run_instances(
    names: dict[str, str], common: list[str], found: dict[str, str], image_bytes: int
) -> None:
    def create(name: str, *extra: str) -> None:
        made = run_ocixfs("incus", "create", name, *common, *extra, "--start", timeout=300,
                          check=False)
        log = _run("incus", "info", "--show-log", name).stdout
        assert made.returncode == 0, made.stderr + log

    # a privileged and an unprivileged system container: systemd boots as PID 1
    create(names["priv"], "--privileged")
    # every mount of this test's image settings shares one prefix: NAME-HASH-
    key = found["key"] = _lower_of(names["priv"]).name.rsplit("-", 2)[0]
    create(names["unpriv"])
    for name in (names["priv"], names["unpriv"]):
        assert _booted(name) in ("running", "degraded"), _exec(name, "systemctl --failed").stdout
        assert _exec(name, "cat /proc/1/comm").stdout == "systemd\n"
        # owners appear right inside: root:shadow (gid 42), as in the image
        assert _exec(name, "stat -c %u:%g /etc/shadow /usr/bin").stdout == "0:42\n0:0\n"
    (priv_lower,) = _incus_mounts(f"{key}-0-0")
    (unpriv_lower,) = (p for p in _incus_mounts(key) if p != priv_lower)
    base = int(unpriv_lower.name.rsplit("-", 1)[1])
    assert os.stat(unpriv_lower / "etc/shadow").st_gid == base + 42

    # a second unprivileged instance shares the mount (one daemon) and the cache
    before = _stats(unpriv_lower)
    create(names["unpriv2"])
    assert _booted(names["unpriv2"]) in ("running", "degraded")
    assert _incus_mounts(key) == sorted([priv_lower, unpriv_lower])
    after = _stats(unpriv_lower)
    assert after["pid"] == before["pid"]
    assert after["bytes_fetched"] - before["bytes_fetched"] < image_bytes // 100
    fetched = _stats(priv_lower)["bytes_fetched"] + after["bytes_fetched"]
    assert 0 < fetched < image_bytes // 4, f"fetched {fetched} of {image_bytes} bytes"

    # writes land in the instance's volume and survive a restart
    unpriv = names["unpriv"]
    assert _exec(unpriv, "echo kept > /root/kept && echo changed >> /etc/motd").returncode == 0
    restart = _run("incus", "restart", unpriv, timeout=180)
    assert restart.returncode == 0, restart.stderr
    assert _exec(unpriv, "cat /root/kept; tail -1 /etc/motd").stdout == "kept\nchanged\n"
    volume = Path(os.path.realpath(f"/var/lib/incus/containers/{unpriv}"))
    assert os.stat(volume / "rootfs/root/kept").st_uid == base
    assert _exec(names["unpriv2"], "test -e /root/kept || echo clean").stdout == "clean\n"

    # a dead daemon: the next start fails at once and says why; after the instances that
    # used it stop, the next start mounts the image again
    run_ocixfs("incus", "create", names["priv2"], *common, "--privileged")
    os.kill(_stats(priv_lower)["pid"], signal.SIGKILL)
    started = time.monotonic()
    failed = _run("incus", "start", names["priv2"], timeout=120)
    assert failed.returncode != 0 and time.monotonic() - started < 60
    log = _run("incus", "info", "--show-log", names["priv2"]).stdout
    assert "ocixfs daemon serving" in log and "is dead" in log, log
    assert _run("incus", "stop", "--force", names["priv"], timeout=120).returncode == 0
    wait_for(lambda: not is_mounted(priv_lower), timeout=30, what="the dead mount released")
    again = _run("incus", "start", names["priv2"], timeout=120)
    assert again.returncode == 0, again.stderr
    assert _booted(names["priv2"]) in ("running", "degraded")
    # the image was mounted before with this shift: this mount is stacked (the kernel
    # serves the metadata), and systemd boots on it
    assert mount_type(priv_lower) == ("overlay" if kernel_can_stack() else "fuse.ocixfs")

    # the same for an unprivileged instance: once both users of its mount stop, the next
    # start mounts it again, stacked, under LXC's own overlay in the user namespace
    for name in (names["unpriv"], names["unpriv2"]):
        assert _run("incus", "stop", "--force", name, timeout=120).returncode == 0
    wait_for(lambda: not is_mounted(unpriv_lower), timeout=30, what="the mount released")
    restarted = _run("incus", "start", unpriv, timeout=180)
    assert restarted.returncode == 0, restarted.stderr
    assert mount_type(unpriv_lower) == ("overlay" if kernel_can_stack() else "fuse.ocixfs")
    assert _booted(unpriv) in ("running", "degraded"), _exec(unpriv, "systemctl --failed").stdout
    assert _exec(unpriv, "cat /root/kept; stat -c %u:%g /etc/shadow").stdout == "kept\n0:42\n"

    # delete: the last instance of each mount takes it away
    for name in names.values():
        deleted = _run("incus", "delete", "--force", name, timeout=120)
        assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: not _incus_mounts(key), timeout=30, what="the image mounts to go")
    assert not any((RUN_DIR / "users").glob(f"{key}*/*"))
