"""Incus instances whose root filesystem is fetched on demand.

An instance prepared by ``ocixfs incus create``/``prepare`` is an ordinary Incus container
created ``--empty``; its ``raw.lxc`` replaces the root filesystem with an overlay:

- lower: an ocixfs mount of the image, one per image (and id shift) per host, under
  ``/run/ocixfs-incus/mounts/``, shared by every instance of that image;
- upper: the instance's own ``rootfs`` directory in its Incus storage volume, so its writes
  persist across restarts and go away with ``incus delete``.

LXC mounts the overlay itself, in the container's mount namespace (inside the user
namespace for an unprivileged instance: ``userxattr``), so nothing but the shared image
mount ever appears on the host. Two LXC hooks (``ocixfs incus hook``) run on the host:
``pre-start`` mounts the image if no instance has it mounted yet; ``post-stop`` unmounts it
after the last one stops. The users of a mount are counted by registrations under
``/run/ocixfs-incus/users/``, each naming the LXC monitor process of its instance: one whose
monitor is gone (a start that failed after ``pre-start``, whose ``post-stop`` never runs) no
longer counts, and the next hook on the host releases what it held.

Unprivileged instances: FUSE mounts cannot be idmapped with libfuse 3.14 (``mount_setattr``
answers EINVAL here), nor can overlayfs itself, so the image is mounted with
``-o uidshift=BASE,gidshift=BASE``: its owners appear shifted by the instance's idmap base,
i.e. right inside the container. Instances with the same base share that mount; privileged
ones share an unshifted one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ocixfs.errors import OcixError
from ocixfs.mount.mounts import mount_type
from ocixfs.mount.stacking import is_ocixfs_mount
from ocixfs.safefs import trusted_directory

__all__ = [
    "MARK_BEGIN",
    "MARK_END",
    "RUN_DIR",
    "HookError",
    "IdShift",
    "ImageSpec",
    "idshift_from_lxc_config",
    "idshift_from_volatile",
    "merge_raw_lxc",
    "mount_dir",
    "post_stop",
    "pre_start",
    "raw_lxc",
]

RUN_DIR = Path("/run/ocixfs-incus")  # not in /run/ocixfs: that one is 0700
MARK_BEGIN = "# ocixfs incus: begin (written by 'ocixfs incus prepare'; do not edit)"
MARK_END = "# ocixfs incus: end"
PROBE_TIMEOUT = 10.0
MOUNT_TIMEOUT = 150.0
UMOUNT_TIMEOUT = 60.0


class HookError(OcixError):
    """A hook refuses to start an instance; the message says why and what to do."""


@dataclass(frozen=True)
class IdShift:
    """The host ids of the container's uid 0 and gid 0 (0, 0 for a privileged instance)."""

    uid: int = 0
    gid: int = 0

    @property
    def privileged(self) -> bool:
        return self.uid == 0 and self.gid == 0


@dataclass(frozen=True)
class ImageSpec:
    """What the shared mount serves: the ``ocixfs mount`` arguments, minus the mountpoint."""

    image: str
    stores: tuple[str, ...] = ()
    cache_dir: str | None = None
    digest: str | None = None
    prefetch: str = "none"

    def mount_args(self) -> list[str]:
        args = [self.image]
        for store in self.stores:
            args += ["--store", store]
        if self.cache_dir is not None:
            args += ["--cache-dir", self.cache_dir]
        if self.digest is not None:
            args += ["--digest", self.digest]
        return [*args, "--prefetch", self.prefetch]

    def key(self, shift: IdShift) -> str:
        """A file name for this image and shift: readable, and distinct per settings."""
        stem = self.image.rstrip("/").rsplit("/", 1)[-1].removesuffix(".ocix")
        stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:40] or "image"
        text = json.dumps([self.image, self.stores, self.cache_dir, self.digest, self.prefetch])
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return f"{stem}-{digest}-{shift.uid}-{shift.gid}"


def mount_dir(spec: ImageSpec, shift: IdShift, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / "mounts" / spec.key(shift)


# -- configuration ------------------------------------------------------------------------------


def idshift_from_volatile(text: str | None) -> IdShift:
    """The shift from Incus's ``volatile.idmap.next`` (JSON; empty or ``[]``: privileged)."""
    uid = gid = 0
    for entry in json.loads(text) if text else []:
        if int(entry["Nsid"]) <= 0 < int(entry["Nsid"]) + int(entry["Maprange"]):
            base = int(entry["Hostid"]) - int(entry["Nsid"])
            if entry.get("Isuid"):
                uid = base
            if entry.get("Isgid"):
                gid = base
    return IdShift(uid, gid)


def idshift_from_lxc_config(text: str) -> IdShift:
    """The shift from ``lxc.idmap = u|g NSID HOSTID RANGE`` lines (none: privileged)."""
    uid = gid = 0
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() != "lxc.idmap":
            continue
        kind, nsid, hostid, count = value.split()
        if int(nsid) <= 0 < int(nsid) + int(count):
            base = int(hostid) - int(nsid)
            if kind in ("u", "b"):
                uid = base
            if kind in ("g", "b"):
                gid = base
    return IdShift(uid, gid)


def raw_lxc(*, lower: Path, upper: Path, shift: IdShift, hook: Sequence[str],
            hook_args: Sequence[str]) -> str:
    """The ``raw.lxc`` block: the overlay root and the two hooks, each ``hook TYPE
    hook_args`` (Incus sets ``lxc.hook.version = 1``: LXC passes the rest in the environment
    and runs the line through a shell)."""
    for path in (lower, upper):
        if ":" in os.fspath(path) or "\n" in os.fspath(path):
            raise OcixError(f"{path}: LXC's overlay syntax cannot hold ':' in a path")
    # Unprivileged: LXC mounts the overlay inside the user namespace, where trusted.*
    # xattrs are refused; userxattr keeps whiteouts and opaque directories working. The
    # option also replaces Incus's 'idmap=container', which LXC allows on 'dir' roots only.
    options = "" if shift.privileged else "userxattr"
    return "\n".join([
        MARK_BEGIN,
        f"lxc.rootfs.path = overlay:{lower}:{upper}",
        f"lxc.rootfs.options = {options}".rstrip(),
        f"lxc.hook.pre-start = {shlex.join([*hook, 'pre-start', *hook_args])}",
        f"lxc.hook.post-stop = {shlex.join([*hook, 'post-stop', *hook_args])}",
        MARK_END,
    ])


def merge_raw_lxc(existing: str, block: str) -> str:
    """``existing`` raw.lxc with a previous ocixfs block replaced by ``block``; other lines
    are kept (before it: LXC applies the last value of a key, so ours win)."""
    kept: list[str] = []
    inside = False
    for line in existing.splitlines():
        if line == MARK_BEGIN:
            inside = True
        elif line == MARK_END:
            inside = False
        elif not inside:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join([*kept, block]) if kept else block


# -- hooks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookContext:
    """What LXC tells a hook (its environment), plus the monitor process it runs under."""

    name: str
    rootfs: Path
    config_text: str
    log_file: Path | None
    monitor: tuple[int, int]

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> HookContext:
        missing = [k for k in ("LXC_NAME", "LXC_ROOTFS_PATH", "LXC_CONFIG_FILE") if k not in env]
        if missing:
            raise HookError(f"not run by LXC as a hook ({', '.join(missing)} unset)")
        config_text = Path(env["LXC_CONFIG_FILE"]).read_text()
        log_file = None
        for line in config_text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "lxc.log.file":
                log_file = Path(value.strip())
        # Incus writes its own root (dir:PATH, the instance's volume) before raw.lxc's overlay.
        roots = [value.strip() for key, _, value in
                 (line.partition("=") for line in config_text.splitlines())
                 if key.strip() == "lxc.rootfs.path"]
        dirs = [root.removeprefix("dir:") for root in roots if root.startswith(("dir:", "/"))]
        rootfs = dirs[0] if dirs else env["LXC_ROOTFS_PATH"]
        return cls(name=env["LXC_NAME"], rootfs=Path(rootfs), config_text=config_text,
                   log_file=log_file, monitor=_monitor())

    def report(self, message: str) -> None:
        """Put ``message`` where ``incus info --show-log`` shows it (and on stderr)."""
        print(f"ocixfs: {message}", file=sys.stderr)
        if self.log_file is None:
            return
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"
        with contextlib.suppress(OSError), open(self.log_file, "a") as log:
            log.write(f"lxc {self.name} {stamp} ERROR    ocixfs - {message}\n")


def pre_start(ctx: HookContext, *, spec: ImageSpec, lower: Path, upper: Path, shift: IdShift,
              ocixfs: Sequence[str], run_dir: Path = RUN_DIR) -> None:
    """Check the instance matches its raw.lxc, prepare the upper layer, make sure the image
    is mounted at ``lower`` and count this instance as one of its users."""
    if os.path.realpath(ctx.rootfs) != os.path.realpath(upper):
        raise HookError(
            f"raw.lxc of {ctx.name} was written for {upper}, but its root is {ctx.rootfs}"
            f" (renamed or copied?): run 'ocixfs incus prepare {ctx.name} IMAGE …' again")
    actual = idshift_from_lxc_config(ctx.config_text)
    if actual != shift:
        raise HookError(
            f"{ctx.name} was prepared for ids shifted by {shift.uid}:{shift.gid} but now runs"
            f" with {actual.uid}:{actual.gid} (security.privileged or idmap changed): run"
            f" 'ocixfs incus prepare {ctx.name} IMAGE …' again")
    _prepare_upper(upper, shift)
    with _locked(run_dir):
        registration = _register(run_dir, lower, ctx)
        try:
            _release_unused(run_dir, ocixfs, keep=lower)
            _ensure_mounted(run_dir, spec, lower, shift, ocixfs, ctx.name)
        except BaseException:
            registration.unlink(missing_ok=True)
            raise


def post_stop(ctx: HookContext, *, lower: Path, ocixfs: Sequence[str],
              run_dir: Path = RUN_DIR) -> None:
    """This instance no longer uses ``lower``; unmount what no running instance uses."""
    with _locked(run_dir):
        users = run_dir / "users" / lower.name
        (users / _registration_name(ctx)).unlink(missing_ok=True)
        _release_unused(run_dir, ocixfs)


def _prepare_upper(upper: Path, shift: IdShift) -> None:
    """LXC puts the overlay's work directory beside the upper one; in an unprivileged
    instance it creates it, and writes the upper, as the container's root."""
    work = upper.parent / "work"
    for path in (upper, work):
        path.mkdir(mode=0o755, exist_ok=True)
        if not shift.privileged:
            st = path.stat()
            if (st.st_uid, st.st_gid) != (shift.uid, shift.gid):
                os.chown(path, shift.uid, shift.gid)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    trusted_directory(run_dir, what="the ocixfs incus run directory")
    fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _monitor() -> tuple[int, int]:
    """(pid, start time) of the LXC monitor this hook runs under: the nearest ancestor
    titled ``[lxc monitor]``, else the parent. It lives as long as the instance."""
    pid = os.getppid()
    for _ in range(4):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            break
        if cmdline.startswith(b"[lxc monitor]"):
            return pid, _start_time(pid) or 0
        parent = _parent(pid)
        if parent is None or parent <= 1:
            break
        pid = parent
    return os.getppid(), _start_time(os.getppid()) or 0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def _registration_name(ctx: HookContext) -> str:
    return f"{ctx.name}@{ctx.monitor[0]}-{ctx.monitor[1]}"


def _register(run_dir: Path, lower: Path, ctx: HookContext) -> Path:
    users = run_dir / "users" / lower.name
    users.mkdir(parents=True, exist_ok=True)
    path = users / _registration_name(ctx)
    path.write_text(f"{ctx.name}\n")
    return path


def _live_users(run_dir: Path, key: str) -> list[str]:
    """Instances using mount ``key`` whose monitor still runs; stale entries are removed."""
    live = []
    users = run_dir / "users" / key
    for entry in sorted(users.iterdir()) if users.is_dir() else []:
        name, _, process = entry.name.rpartition("@")
        pid, _, start = process.partition("-")
        if pid.isdigit() and start.isdigit() and _start_time(int(pid)) == int(start):
            live.append(name)
        else:
            entry.unlink(missing_ok=True)
    return live


def _release_unused(run_dir: Path, ocixfs: Sequence[str], keep: Path | None = None) -> None:
    """Unmount every image mount no live instance uses (but ``keep``)."""
    mounts = run_dir / "mounts"
    for lower in sorted(mounts.iterdir()) if mounts.is_dir() else []:
        if lower == keep or _live_users(run_dir, lower.name):
            continue
        if _mounted(lower):
            _unmount(lower, ocixfs)
        with contextlib.suppress(OSError):
            lower.rmdir()
        with contextlib.suppress(OSError):
            (run_dir / "users" / lower.name).rmdir()


def _mounted(path: Path) -> str | None:
    """The fstype mounted at ``path`` (host mount namespace), or None."""
    return mount_type(path) or None


def _probe(path: Path) -> str | None:
    """None if the mount at ``path`` answers within PROBE_TIMEOUT, else why not. A child
    process asks, so a daemon that hangs cannot hang the hook."""
    code = "import os, sys; os.stat(sys.argv[1]); os.listdir(sys.argv[1])"
    try:
        result = subprocess.run([sys.executable, "-c", code, os.fspath(path)],
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"no answer within {PROBE_TIMEOUT:.0f} s"
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def _ensure_mounted(run_dir: Path, spec: ImageSpec, lower: Path, shift: IdShift,
                    ocixfs: Sequence[str], name: str) -> None:
    fstype = _mounted(lower)
    if fstype is not None and not is_ocixfs_mount(lower):
        raise HookError(f"{lower} holds a {fstype} mount, not ocixfs")
    if fstype is not None:
        problem = _probe(lower)
        if problem is None:
            return
        others = _live_users(run_dir, lower.name)
        others.remove(name)  # this instance registered itself already
        if others:
            users = ", ".join(sorted(set(others)))
            raise HookError(
                f"the ocixfs daemon serving {spec.image} at {lower} is dead ({problem});"
                f" running instances still use it ({users}): stop them, then start again")
        _unmount(lower, ocixfs)
    lower.mkdir(mode=0o755, parents=True, exist_ok=True)
    command = [*ocixfs, "mount", *spec.mount_args(), os.fspath(lower)]
    if not shift.privileged:
        command += ["-o", f"uidshift={shift.uid},gidshift={shift.gid}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        _unmount(lower, ocixfs)
        raise HookError(
            f"mounting {spec.image} at {lower} took over {MOUNT_TIMEOUT:.0f} s") from None
    if result.returncode != 0 or _mounted(lower) is None:
        lines = result.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise HookError(f"mounting {spec.image} at {lower} failed: {reason}")


def _unmount(lower: Path, ocixfs: Sequence[str]) -> None:
    """``ocixfs umount`` (waits for the daemon); a dead or stuck one is detached lazily."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([*ocixfs, "umount", os.fspath(lower)],
                       capture_output=True, timeout=UMOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
    for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if _mounted(lower) is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*command, os.fspath(lower)], capture_output=True, timeout=30)
    if _mounted(lower) is not None:
        raise HookError(f"could not unmount {lower}: {os.strerror(errno.EBUSY)}")
