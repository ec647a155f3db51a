"""Recording a profile without a deployment: run a command inside an image, privately.

``record`` runs each command of a ``RecordPlan`` on a fresh mount of the image that only
it can see, and returns the profiles the mounts recorded (``--record-profile``, the same
recorder every mount has), merged. One run is three processes under the caller::

    caller ──fork──▶ runner: own mount namespace (CLONE_NEWNS, every mount private)
                       ├─fork─▶ daemon: run_foreground(IMAGE at WORK/lower), records
                       │          WORK/run-N.profile at unmount, ready via NOTIFY_SOCKET
                       │  overlay WORK/root = WORK/lower + tmpfs upper (writes work)
                       └─fork─▶ init: pid 1 of a new PID namespace; mounts /proc and a
                                  minimal /dev in WORK/root, chroots there, runs CMD

The command's stdin, stdout and stderr are the caller's. When it exits, or at the
timeout, the runner SIGKILLs the init, so the kernel kills everything left in the PID
namespace (a command's background processes included); then it unmounts everything
under WORK (the FUSE mount last), waits for the daemon to exit and writes its verdict to
WORK/run-N.json. A SIGINT or SIGTERM to the caller (Ctrl-C) is passed to the runner as
SIGTERM, which cleans up the same way; the runner and the daemon die with their parent
(``PR_SET_PDEATHSIG``: the daemon then unmounts itself), and every mount lives in the
runner's namespace, invisible to the host and gone with its processes. The caller
removes WORK last. Nothing here writes the result: the caller does, atomically.

``/dev`` in the chroot is a tmpfs with ``null``, ``zero``, ``full``, ``random``,
``urandom``, ``tty``, ``fd``/``stdin``/``stdout``/``stderr`` links and ``shm``, not the
host's: a command being profiled sees no host disk. The command runs as the caller (root),
with the host's network, a clean environment (``RUN_ENVIRONMENT`` plus ``TERM``) and ``/``
as its working directory: record only images you would run as root.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ocixfs.config import FetchConfig
from ocixfs.errors import OcixError, UsageError
from ocixfs.mount.mounts import (
    MNT_DETACH,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    mount,
    mounts_below,
    umount,
)

if TYPE_CHECKING:  # imported when used: 'ocixfs profile --help' needs none of them
    from ocixfs.mount.config import MountConfig
    from ocixfs.mount.profile import Profile
    from ocixfs.store.spec import StoreSpec

__all__ = ["DEFAULT_TIMEOUT", "RUN_ENVIRONMENT", "RecordPlan", "Recording", "RunResult",
           "record"]

DEFAULT_TIMEOUT = 300.0
READY_TIMEOUT = 120.0      # the mount's start-up (manifest already loaded: the stores' probe)
DAEMON_EXIT_TIMEOUT = 30.0  # from the unmount to the daemon's exit (it writes the profile)
RUNNER_EXIT_TIMEOUT = DAEMON_EXIT_TIMEOUT + 30.0  # the caller's wait after a SIGTERM
RUN_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}

_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG = 1
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
            "urandom": (1, 9), "tty": (5, 0)}
_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
              "stderr": "/proc/self/fd/2"}


@dataclass(frozen=True, kw_only=True)
class RecordPlan:
    """What to record: ``image`` (an absolute path or a URL) mounted from ``stores`` with
    ``cache_dir``; every command of ``commands`` (argv lists) run ``repeat`` times, each
    run on its own mount, killed after ``timeout`` seconds. ``output_to_stderr``: the
    commands' stdout goes to stderr (the caller's stdout carries JSON)."""

    image: str
    stores: tuple[StoreSpec, ...]
    cache_dir: Path
    commands: tuple[tuple[str, ...], ...]
    repeat: int = 1
    timeout: float = DEFAULT_TIMEOUT
    fetch: FetchConfig = field(default_factory=FetchConfig)
    output_to_stderr: bool = False

    def runs(self) -> list[tuple[str, ...]]:
        """The commands in the order they run: all of them, ``repeat`` times over."""
        return [command for _ in range(self.repeat) for command in self.commands]


@dataclass(frozen=True)
class RunResult:
    """One run: its command, exit status (128 + N when killed by signal N; None when it
    was killed at the timeout) and how many files its mount recorded."""

    command: tuple[str, ...]
    status: int | None
    files: int

    @property
    def succeeded(self) -> bool:
        return self.status == 0


@dataclass(frozen=True)
class Recording:
    """The merged profile of every run (each path once, at its earliest first access in
    any run, in that order) and the runs."""

    profile: Profile
    runs: tuple[RunResult, ...]


def record(plan: RecordPlan, tree: Any, image_digest: str,
           announce: Callable[[str], None] = lambda _: None) -> Recording:
    """Run every command of ``plan`` on a private mount of the image (``tree``, decoded
    by the caller) and merge what the mounts recorded. ``announce`` is told of each run
    before it starts. Raises ``OcixError`` when a mount cannot be set up;
    ``KeyboardInterrupt`` on SIGINT or SIGTERM, after everything was cleaned up."""
    from ocixfs.mount.profile import merge

    results: list[RunResult] = []
    profiles: list[Profile] = []
    runs = plan.runs()
    with _work_directory() as work, _signals_interrupt():
        for index, command in enumerate(runs):
            announce(f"run {index + 1}/{len(runs)}: {_shown(command)}")
            profile, status = _record_run(plan, tree, image_digest, work, index, command)
            profiles.append(profile)
            results.append(RunResult(command, status, len(profile.entries)))
    return Recording(merge(profiles), tuple(results))


def _shown(command: Sequence[str]) -> str:
    import shlex

    return shlex.join(command)


@contextlib.contextmanager
def _work_directory() -> Iterator[Path]:
    """A fresh private (0700) directory for one recording, removed at the end. Nothing is
    ever mounted on it in the caller's mount namespace."""
    work = Path(tempfile.mkdtemp(prefix="ocixfs-record-"))
    if any(c in os.fspath(work) for c in ",:\\\n"):  # overlayfs options cannot quote them
        shutil.rmtree(work)
        raise UsageError(f"{work}: a temporary directory overlayfs cannot name; set TMPDIR")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, so a stopped recording cleans up
    (also when SIGINT was inherited ignored, as a shell's background job has it)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _record_run(plan: RecordPlan, tree: Any, image_digest: str, work: Path, index: int,
                command: tuple[str, ...]) -> tuple[Profile, int | None]:
    """One run in a forked runner; its profile (empty if it opened nothing) and status."""
    paths = _RunPaths(work, index)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _exit_after(lambda: _runner(plan, tree, image_digest, paths, command))
    try:
        _, wait_status = os.waitpid(pid, 0)
    except KeyboardInterrupt:
        _stop_runner(pid)
        raise
    verdict = _read_verdict(paths.verdict, wait_status)
    return _run_profile(paths.profile), verdict


def _stop_runner(pid: int) -> None:
    """After an interrupt: SIGTERM the runner (it cleans up) and wait for it, bounded;
    further SIGINTs and SIGTERMs are ignored meanwhile."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        os.kill(pid, signal.SIGTERM)
        if _wait_exit(pid, RUNNER_EXIT_TIMEOUT) is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _read_verdict(path: Path, wait_status: int) -> int | None:
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        raise OcixError(f"recording failed (runner exit status {wait_status})") from None
    if verdict.get("error"):
        raise OcixError(str(verdict["error"]))
    status = verdict.get("status")
    return None if status is None else int(status)


def _run_profile(path: Path) -> Profile:
    """What the run's mount recorded; it writes nothing when nothing was opened."""
    from ocixfs.mount.profile import Profile, decode_profile, read_profile_file

    try:
        data = read_profile_file(path)
    except FileNotFoundError:
        return Profile(())
    except OSError as exc:
        raise OcixError(f"{path}: {exc.strerror}") from None
    return decode_profile(data, source=os.fspath(path))


@dataclass(frozen=True)
class _RunPaths:
    work: Path
    index: int

    @property
    def lower(self) -> Path:
        return self.work / "lower"

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def upper(self) -> Path:
        return self.work / "rw"

    @property
    def notify(self) -> Path:
        return self.work / f"notify-{self.index}"

    @property
    def log(self) -> Path:
        return self.work / f"mount-{self.index}.log"

    @property
    def profile(self) -> Path:
        return self.work / f"run-{self.index}.profile"

    @property
    def verdict(self) -> Path:
        return self.work / f"run-{self.index}.json"


def _exit_after(body: Callable[[], int]) -> NoReturn:
    """In a forked child: run ``body`` and leave with its status, never returning into
    the parent's stack (an unexpected exception: one line, status 1)."""
    status = 1
    try:
        status = body()
    except BaseException as exc:  # noqa: BLE001 -- the child must end here, whatever happens
        with contextlib.suppress(Exception):
            print(f"ocixfs: {_one_line(exc)}", file=sys.stderr, flush=True)
    finally:
        os._exit(status)


def _one_line(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OcixError) else f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------
# The runner: one run in its own mount namespace


class _Stopped(BaseException):
    """SIGINT or SIGTERM reached the runner: clean up, record nothing."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped


def _runner(plan: RecordPlan, tree: Any, image_digest: str, paths: _RunPaths,
            command: tuple[str, ...]) -> int:
    """Set up the private mount, run the command, clean up; the verdict goes to
    ``paths.verdict`` (absent when stopped by a signal)."""
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    init: int | None = None
    verdict: dict[str, object] = {}
    try:
        _unshare(_CLONE_NEWNS)
        mount("none", Path("/"), None, MS_REC | MS_PRIVATE)
        for directory in (paths.lower, paths.root, paths.upper):
            directory.mkdir(exist_ok=True)
        _start_daemon(_mount_config(plan, paths), tree, image_digest, paths)
        _overlay(paths)
        _unshare(_CLONE_NEWPID)
        init = _fork_child(lambda: _init(paths.root, command, plan.output_to_stderr))
        status = _wait_exit(init, plan.timeout)
        if status is None:
            print(f"ocixfs: {_shown(command)}: still running after {plan.timeout:g} s; "
                  "killed with everything it started", file=sys.stderr, flush=True)
        init = None if status is not None else init
        verdict = {"status": status}
    except _Stopped:
        verdict = {}
    except (OcixError, OSError) as exc:
        verdict = {"error": _one_line(exc) if isinstance(exc, OcixError) else
                   f"cannot set up the private mount: {exc}"}
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        _clean_up(paths, init, verdict)
    if verdict:
        paths.verdict.write_text(json.dumps(verdict))
    return 0


def _mount_config(plan: RecordPlan, paths: _RunPaths) -> MountConfig:
    from ocixfs.config import ReaderConfig
    from ocixfs.mount.config import MountConfig

    return MountConfig(
        image=plan.image,
        mountpoint=paths.lower,
        stores=plan.stores,
        cache_dir=plan.cache_dir,
        reader=ReaderConfig(fetch=plan.fetch),
        fsname="ocixfs-record",
        record_profile=paths.profile,
    )


def _fork_child(body: Callable[[], int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _exit_after(body)
    return pid


def _start_daemon(config: MountConfig, tree: Any, image_digest: str,
                  paths: _RunPaths) -> None:
    """Fork the mount's daemon and return once it serves; a failed start is an
    ``OcixError`` with the daemon's last log line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(os.fspath(paths.notify))
        pid = _fork_child(lambda: _daemon(config, tree, image_digest, paths))
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            readable, _, _ = select.select([notify], [], [], 0.2)
            if readable and b"READY=1" in notify.recv(4096):
                return
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                raise OcixError(f"cannot mount the image: {_last_line(paths.log)}")
        raise OcixError(f"the mount did not come up within {READY_TIMEOUT:g} s")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1].split("ocixfs: ", 1)[-1] if lines else "the daemon exited"


def _daemon(config: MountConfig, tree: Any, image_digest: str, paths: _RunPaths) -> int:
    """The mount's daemon: its own session (no terminal signals), dies with the runner
    (SIGTERM: it unmounts), logs to ``paths.log``, tells readiness on ``paths.notify``."""
    from ocixfs.log import timestamp_lines
    from ocixfs.mount.daemon import open_log_file, run_foreground
    from ocixfs.mount.startup import LoadedImage

    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # run_foreground's trio handles them
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log_fd = open_log_file(paths.log)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd, target in ((0, devnull), (1, devnull), (2, log_fd)):
        os.dup2(target, fd)
    timestamp_lines()
    os.environ["NOTIFY_SOCKET"] = os.fspath(paths.notify)
    loaded = LoadedImage(image_digest, tree, None, config.stores, from_index=True)
    return run_foreground(config, lambda _plan_seen: loaded)


def _overlay(paths: _RunPaths) -> None:
    """WORK/root: the image (read-only, FUSE) under a tmpfs that takes the writes."""
    mount("tmpfs", paths.upper, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    (paths.upper / "upper").mkdir()
    (paths.upper / "work").mkdir()
    options = (f"lowerdir={paths.lower},upperdir={paths.upper}/upper,"
               f"workdir={paths.upper}/work")
    mount("overlay", paths.root, "overlay", MS_NODEV, options)


def _clean_up(paths: _RunPaths, init: int | None, verdict: dict[str, object]) -> None:
    """Kill what still runs of the command, unmount everything under WORK (the FUSE mount
    last: its daemon then writes the profile and exits) and reap every child (the daemon
    within ``DAEMON_EXIT_TIMEOUT``, else it is killed and the run has no profile)."""
    if init is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
    for mountpoint in mounts_below(paths.work):
        _unmount(mountpoint)
    if not _reap_children(DAEMON_EXIT_TIMEOUT):
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap_children(DAEMON_EXIT_TIMEOUT)
        verdict.setdefault("error", "the mount's daemon did not exit; no profile")
    _report_log(paths.log)


def _reap_children(timeout: float) -> bool:
    """Wait for every child of this process, at most ``timeout`` seconds: whether all
    have exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _children() -> list[int]:
    """The pids of this process's children (``/proc/self/task/*/children``)."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(pid) for pid in (task / "children").read_text().split()]
    return found


def _unmount(mountpoint: Path) -> None:
    """Unmount, detaching lazily if something still holds it."""
    try:
        umount(mountpoint)
    except OSError:
        with contextlib.suppress(OSError):
            umount(mountpoint, MNT_DETACH)


def _report_log(log: Path) -> None:
    """Pass on what the mount's daemon logged beyond routine lines."""
    from ocixfs.log import only_routine_lines

    if log.exists() and not only_routine_lines(log):
        sys.stderr.write(log.read_text(errors="replace"))
        sys.stderr.flush()


def _wait_exit(pid: int, timeout: float) -> int | None:
    """Wait for the child ``pid`` at most ``timeout`` seconds: its exit status (128 + N
    when killed by signal N), or None if it still runs."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return _exit_status(wait_status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


# ----------------------------------------------------------------------------------------
# The init: pid 1 of the command's PID namespace


def _init(root: Path, command: tuple[str, ...], output_to_stderr: bool) -> int:
    """Mount /proc (of this PID namespace) and /dev in ``root``, chroot there and run the
    command; its status is ours. When we exit, the kernel kills the rest of the namespace."""
    import subprocess

    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _ignore)  # caught, so reset to the default at exec
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _minimal_dev(root / "dev")
    os.chroot(root)
    os.chdir("/")
    environment = dict(RUN_ENVIRONMENT)
    if "TERM" in os.environ:
        environment["TERM"] = os.environ["TERM"]
    try:
        child = subprocess.Popen(command, env=environment, close_fds=False,
                                 stdout=2 if output_to_stderr else None)
    except OSError as exc:
        print(f"ocixfs: {command[0]}: {exc.strerror} (in the image)", file=sys.stderr)
        return 127
    returncode = child.wait()
    return 128 - returncode if returncode < 0 else returncode


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing."""


def _minimal_dev(dev: Path) -> None:
    dev.mkdir(exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
    for name, (major, minor) in _DEVICES.items():
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, dev / name)
    (dev / "shm").mkdir(mode=0o1777)
    os.chmod(dev / "shm", 0o1777)
    (dev / "pts").mkdir()


# ----------------------------------------------------------------------------------------
# System calls Python 3.11 lacks


_libc = ctypes.CDLL(None, use_errno=True)


def _checked(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _unshare(flags: int) -> None:
    _checked(_libc.unshare(flags), "unshare")


def _prctl(option: int, value: int) -> None:
    _checked(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), "prctl")
