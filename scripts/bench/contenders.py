"""The contenders: ways to get from an image on a server to a container that has started.

Each contender opens a *session* for one image over one link (servers, relay and any
one-off preparation, all outside the clock), then measures single runs. A run:

1. makes fresh scratch directories (and, unless warm, a fresh cache), drops the page cache,
   zeroes the relay's counters;
2. starts the clock, pulls or mounts, runs the workload in a chroot, stops the clock at the
   workload's exit;
3. tears down (unmount, delete) outside the clock, then reads the link's counters again.

Contenders (names used on the command line):

- ``skopeo-umoci``   what Incus does for OCI images today (lxc/incus client/oci_images.go):
                     ``skopeo copy`` from a registry, ``umoci unpack --keep-dirlinks``, then
                     the workload. Incus then also re-tars and gzips the rootfs into its image
                     store and unpacks it again; that is left out, so this row flatters it.
- ``casync``         ``casync mount`` of a chunk store over HTTP: a lazy FUSE peer.
- ``ocixfs``         ``ocixfs mount`` with a fresh cache and no profile anywhere (so
                     ``--prefetch auto`` follows executables: ``mount.predict``).
- ``ocixfs-ondemand`` the same with ``--prefetch none``: reads fetch what they touch.
- ``ocixfs-profile`` ``ocixfs mount --prefetch FILE``, FILE recorded on an earlier run
                     (``--record-profile``) in the same session.
- ``ocixfs-recorded`` ``ocixfs mount`` (``--prefetch auto``, the default) with a fresh cache
                     and ``IMAGE.profile`` beside the served manifest, made before the
                     session by ``ocixfs profile record IMAGE -- WORKLOAD`` (no deployment:
                     a private mount of the local image and store, its own cache); the file
                     is removed when the session ends, so other contenders never see it.
- ``ocixfs-borrowed`` version N+1 of the image (``images.NEXT_VERSIONS``: rebuilt with one
                     package added and python3.11's bytecode rebuilt) mounted with
                     ``--prefetch auto`` on a host that only ran version N: every run
                     starts from a copy of the cache one untimed run of N left (its blobs
                     and its host profile), so the mount borrows N's profile.
- ``ocixfs-next-ondemand`` the same with ``--prefetch none`` (no borrowing): what version
                     N's cache alone does for N+1.
- ``ocixfs-predict`` ``ocixfs mount --prefetch FILE`` with a fresh cache, FILE what the ELF
                     predictors name for the workload's program (``predictors.elf_closure``:
                     the program, PT_INTERP, DT_NEEDED transitively), played from the mount:
                     the most a predictor firing at the program's exec could gain.
- ``ocixfs-warm``    ``ocixfs mount`` with a cache filled by an earlier run (page cache
                     still dropped).
- ``ocixfs-warm-fresh`` the same, the origin sending the ``Cache-Control`` headers the
                     README advises (manifests and profiles current for 60 s, 404s too), so
                     a mount within that minute asks the origin nothing before it serves.
- ``ocixfs-warm-fresh-fuse`` the same with ``--fuse-only``: the metadata served through
                     FUSE instead of by the kernel (stacked), for an A/B in one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from images import OCI_TAG, ImageSpec, chroot_env
from predictors import predicted_profile
from relay import LinkProfile, Relay
from servers import (
    drop_caches,
    is_mounted,
    nginx,
    registry,
    run_logged,
    started,
    unmount,
    wait_until,
)

__all__ = ["CONTENDERS", "Contender", "RunResult", "SessionContext"]

PULL_TIMEOUT = 1800.0
WORKLOAD_TIMEOUT = 600.0
MOUNT_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResult:
    seconds: float
    bytes_down: int  # server -> client, at the workload's exit
    bytes_up: int
    bytes_down_total: int  # including anything still in flight until teardown ended
    bytes_up_total: int
    connections: int
    requests: int
    extra: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def bytes_total(self) -> int:
        return self.bytes_down_total + self.bytes_up_total


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionContext:
    spec: ImageSpec
    image_dir: Path
    link: LinkProfile
    scratch: Path  # an empty directory owned by this session
    log: Path
    ocixfs: Path
    ocix_image: Path | None = None
    ocix_store: Path | None = None
    manifest_over_link: bool = True
    next_version: tuple[Path, Path] | None = None  # (image, store) of version N+1


class Session(Protocol):
    def run_once(self) -> RunResult: ...


class Contender(Protocol):
    name: str
    description: str
    needs_ocixfs: bool

    def session(self, ctx: SessionContext) -> contextlib.AbstractContextManager[Session]: ...


def run_workload(ctx: SessionContext, root: Path) -> None:
    proc = subprocess.run(
        ["chroot", root, *ctx.spec.workload.argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=chroot_env(),
        timeout=WORKLOAD_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"workload exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-400:]}"
        )


def rounded(steps: dict[str, float]) -> dict[str, float]:
    """Step durations in seconds, to the millisecond, for the results file."""
    return {name: round(seconds, 3) for name, seconds in steps.items()}


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def measure(
    relay: Relay,
    requests: Callable[[], int],
    body: Callable[[contextlib.ExitStack], dict[str, object] | None],
) -> RunResult:
    """Time body from a dropped page cache to its return; its ExitStack is the teardown."""
    drop_caches()
    load = float(Path("/proc/loadavg").read_text().split()[0])
    relay.reset_counters()
    requests_before = requests()
    with contextlib.ExitStack() as teardown:
        start = time.perf_counter()
        extra = body(teardown) or {}
        seconds = time.perf_counter() - start
        at_exit = relay.counters()
    total = relay.counters()
    extra["loadavg_before"] = load  # other work on the machine makes runs noisy: say so
    return RunResult(
        seconds=seconds,
        bytes_down=at_exit.bytes_down,
        bytes_up=at_exit.bytes_up,
        bytes_down_total=total.bytes_down,
        bytes_up_total=total.bytes_up,
        connections=total.connections,
        requests=requests() - requests_before,
        extra=extra,
    )


# -- (a) skopeo copy + umoci unpack ------------------------------------------------------------


class _SkopeoSession:
    def __init__(self, ctx: SessionContext, relay: Relay, requests: Callable[[], int]) -> None:
        self.ctx = ctx
        self.relay = relay
        self.requests = requests

    def run_once(self) -> RunResult:
        ctx = self.ctx
        work = fresh_dir(ctx.scratch / "run")
        source = f"docker://127.0.0.1:{self.relay.port}/bench/{ctx.spec.name}:latest"

        def body(teardown: contextlib.ExitStack) -> dict[str, object]:
            teardown.callback(shutil.rmtree, work, ignore_errors=True)
            start = time.perf_counter()
            pull = ["skopeo", "copy", "--insecure-policy", "--src-tls-verify=false", source]
            run_logged([*pull, f"oci:{work / 'oci'}:{OCI_TAG}"], ctx.log, timeout=PULL_TIMEOUT)
            pulled = time.perf_counter()
            unpack = ["umoci", "unpack", "--keep-dirlinks", "--image", f"{work / 'oci'}:{OCI_TAG}"]
            run_logged([*unpack, work / "bundle"], ctx.log, timeout=PULL_TIMEOUT)
            unpacked = time.perf_counter()
            run_workload(ctx, work / "bundle" / "rootfs")
            steps = {
                "skopeo_copy": pulled - start,
                "umoci_unpack": unpacked - pulled,
                "workload": time.perf_counter() - unpacked,
            }
            return {"steps_s": rounded(steps)}

        return measure(self.relay, self.requests, body)


class SkopeoUmoci:
    name = "skopeo-umoci"
    description = "skopeo copy from docker-registry, umoci unpack, chroot"
    needs_ocixfs = False

    @contextlib.contextmanager
    def session(self, ctx: SessionContext) -> Iterator[Session]:
        with registry(ctx.scratch / "registry-storage", ctx.scratch / "registry") as reg:
            run_logged(
                [
                    "skopeo",
                    "copy",
                    "--insecure-policy",
                    "--dest-tls-verify=false",
                    f"oci:{ctx.image_dir / 'oci'}:{OCI_TAG}",
                    f"docker://127.0.0.1:{reg.port}/bench/{ctx.spec.name}:latest",
                ],
                ctx.log,
                timeout=PULL_TIMEOUT,
            )
            with Relay(target=("127.0.0.1", reg.port), link=ctx.link) as relay:
                yield _SkopeoSession(ctx, relay, reg.requests)


# -- (b) casync mount ------------------------------------------------------------------------


class _CasyncSession:
    def __init__(self, ctx: SessionContext, relay: Relay, requests: Callable[[], int]) -> None:
        self.ctx = ctx
        self.relay = relay
        self.requests = requests

    def run_once(self) -> RunResult:
        ctx = self.ctx
        mnt = fresh_dir(ctx.scratch / "mnt")
        base = f"http://127.0.0.1:{self.relay.port}/{ctx.spec.name}"
        argv: list[str | Path] = ["casync", "mount", f"--store={base}.castr", f"{base}.caidx", mnt]

        def body(teardown: contextlib.ExitStack) -> dict[str, object]:
            start = time.perf_counter()
            proc = teardown.enter_context(started(argv, ctx.log))
            teardown.callback(unmount, mnt, ctx.log)  # runs before the process is stopped
            wait_until(
                lambda: is_mounted(mnt),
                MOUNT_TIMEOUT,
                "casync mount",
                alive=lambda: proc.poll() is None,
            )
            mounted = time.perf_counter()
            run_workload(ctx, mnt)
            steps = {"mount": mounted - start, "workload": time.perf_counter() - mounted}
            return {"steps_s": rounded(steps)}

        return measure(self.relay, self.requests, body)


class Casync:
    name = "casync"
    description = "casync mount of a .caidx + .castr chunk store served by nginx"
    needs_ocixfs = False

    @contextlib.contextmanager
    def session(self, ctx: SessionContext) -> Iterator[Session]:
        with (
            nginx(ctx.image_dir / "casync", ctx.scratch / "nginx") as server,
            Relay(target=("127.0.0.1", server.port), link=ctx.link) as relay,
        ):
            yield _CasyncSession(ctx, relay, server.requests)


# -- (c, d, e) ocixfs ------------------------------------------------------------------------


class _OcixfsSession:
    def __init__(
        self,
        ctx: SessionContext,
        relay: Relay,
        requests: Callable[[], int],
        *,
        warm_cache: bool,
        prefetch: str | None,
        seed_cache: Path | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        self.ctx = ctx
        self.options = options
        self.relay = relay
        self.requests = requests
        self.warm_cache = warm_cache
        self.prefetch = prefetch
        self.cache = ctx.scratch / "cache"
        self.seed_cache = seed_cache  # copied into each run's fresh cache
        self.runs = 0

    def image_arg(self) -> str:
        assert self.ctx.ocix_image is not None
        if self.ctx.manifest_over_link:
            return f"http://127.0.0.1:{self.relay.port}/{self.ctx.ocix_image.name}"
        return str(self.ctx.ocix_image)

    def mount_argv(self, mnt: Path, record: Path | None) -> list[str | Path]:
        argv: list[str | Path] = [
            self.ctx.ocixfs,
            "mount",
            self.image_arg(),
            mnt,
            "--store",
            f"http://127.0.0.1:{self.relay.port}/store/",
            "--cache-dir",
            self.cache,
            "--log-file",
            self.ctx.scratch / "daemon.log",
        ]
        if self.prefetch is not None:
            argv += ["--prefetch", self.prefetch]
        if record is not None:
            argv += ["--record-profile", record]
        return [*argv, *self.options]

    def run_once(self, *, record: Path | None = None) -> RunResult:
        ctx = self.ctx
        mnt = fresh_dir(ctx.scratch / "mnt")
        if not (self.warm_cache and self.runs > 0):
            fresh_dir(self.cache)
            if self.seed_cache is not None:
                shutil.copytree(self.seed_cache, self.cache, dirs_exist_ok=True)
        self.runs += 1

        def body(teardown: contextlib.ExitStack) -> dict[str, object]:
            extra: dict[str, object] = {}
            teardown.callback(self.unmount, mnt)
            start = time.perf_counter()
            run_logged(self.mount_argv(mnt, record), ctx.log, timeout=MOUNT_TIMEOUT)
            wait_until(lambda: is_mounted(mnt), MOUNT_TIMEOUT, "ocixfs mount")
            # Off the clock: the teardown reads the counters before it unmounts.
            teardown.callback(lambda: extra.update(stats=self.stats(mnt)))
            mounted = time.perf_counter()
            run_workload(ctx, mnt)
            steps = {"mount": mounted - start, "workload": time.perf_counter() - mounted}
            extra["steps_s"] = rounded(steps)
            return extra

        return measure(self.relay, self.requests, body)

    def unmount(self, mnt: Path) -> None:
        unmount_ocixfs(self.ctx, mnt)

    def stats(self, mnt: Path) -> object:
        proc = subprocess.run(
            [self.ctx.ocixfs, "stats", mnt, "--json"],
            capture_output=True,
            timeout=MOUNT_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.decode(errors="replace").strip()[-300:]}
        try:
            data: object = json.loads(proc.stdout)
        except ValueError:
            return {"error": "stats --json printed no JSON"}
        return data


class Ocixfs:
    """An ocixfs contender; `mode` picks cold, profile-played, borrowed, predicted or warm."""

    NAMES = {"cold": "ocixfs", "ondemand": "ocixfs-ondemand", "profile": "ocixfs-profile",
             "recorded": "ocixfs-recorded",
             "borrowed": "ocixfs-borrowed", "next-ondemand": "ocixfs-next-ondemand",
             "predict": "ocixfs-predict", "warm": "ocixfs-warm",
             "warm-fresh": "ocixfs-warm-fresh", "warm-fresh-fuse": "ocixfs-warm-fresh-fuse"}

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = self.NAMES[mode]
        self.description = {
            "cold": "ocixfs mount, fresh cache, no profile (auto: the ELF predictor)",
            "ondemand": "ocixfs mount --prefetch none, fresh cache",
            "profile": "ocixfs mount --prefetch PROFILE (recorded on an earlier run; its pack in "
                       "the store, as 'ocixfs profile pack' writes it), fresh cache",
            "recorded": "ocixfs mount --prefetch auto, IMAGE.profile made by 'ocixfs profile "
                        "record' (and its pack), fresh cache",
            "borrowed": "version N+1 (a package added, python3.11's .pyc rebuilt), ocixfs mount "
                        "--prefetch auto on a host that ran version N (its cache and host "
                        "profile)",
            "next-ondemand": "version N+1 (a package added, python3.11's .pyc rebuilt), ocixfs "
                             "mount --prefetch none on a host that ran version N (no "
                             "borrowing)",
            "predict": "ocixfs mount --prefetch FILE, FILE the ELF closure of the workload's "
                       "program (PT_INTERP + DT_NEEDED), fresh cache",
            "warm": "ocixfs mount, cache filled by an earlier run",
            "warm-fresh": "ocixfs mount, cache filled by an earlier run, the origin sending "
                          "Cache-Control: max-age=60 on manifests and profiles (404s too)",
            "warm-fresh-fuse": "ocixfs-warm-fresh with --fuse-only (the metadata through "
                               "FUSE, not stacked)",
        }[mode]
        self.needs_ocixfs = True

    @contextlib.contextmanager
    def session(self, ctx: SessionContext) -> Iterator[Session]:
        assert ctx.ocix_image is not None
        if self.mode in ("borrowed", "next-ondemand"):
            with self._next_version_session(ctx) as session:
                yield session
            return
        with (
            nginx(ctx.ocix_image.parent, ctx.scratch / "nginx",
                  publisher_headers=self.mode.startswith("warm-fresh")) as server,
            Relay(target=("127.0.0.1", server.port), link=ctx.link) as relay,
        ):
            warm = self.mode in ("warm", "warm-fresh", "warm-fresh-fuse")
            profile = ctx.scratch / "recorded.profile"
            if self.mode == "predict":
                spec = ctx.spec
                profile.write_bytes(predicted_profile(ctx.image_dir / "ref" / "rootfs",
                                                      spec.workload.argv))
            session = _OcixfsSession(
                ctx,
                relay,
                server.requests,
                warm_cache=warm,
                prefetch=(str(profile) if self.mode in ("profile", "predict")
                          else "none" if self.mode == "ondemand" else None),
                options=("--fuse-only",) if self.mode == "warm-fresh-fuse" else (),
            )
            if self.mode == "profile":
                recorder = _OcixfsSession(
                    ctx, relay, server.requests, warm_cache=False, prefetch="none"
                )
                recorder.run_once(record=profile)
                if not profile.is_file():
                    raise RuntimeError("--record-profile wrote no profile at unmount")
            elif warm:
                session.run_once()  # fills the cache; not counted
            if self.mode == "recorded":
                with recorded_beside(ctx) as beside, packed(ctx, beside):
                    yield session
            elif self.mode == "profile":
                with packed(ctx, profile):
                    yield session
            else:
                yield session

    @contextlib.contextmanager
    def _next_version_session(self, ctx: SessionContext) -> Iterator[Session]:
        """Version N runs once from the local image and store into a seed cache (untimed);
        every timed run mounts version N+1 over the link with a copy of that cache,
        borrowing N's profile (``--prefetch auto``) or not (``none``)."""
        if ctx.next_version is None:
            raise RuntimeError(f"no version N+1 of {ctx.spec.name} (images.NEXT_VERSIONS)")
        seed = fresh_dir(ctx.scratch / "cache-version-n")
        run_locally(ctx, seed)
        if not any((seed / "profiles").glob("*.profile")):
            raise RuntimeError("the run of version N left no host profile")
        next_image, next_store = ctx.next_version
        next_ctx = dataclasses.replace(ctx, ocix_image=next_image, ocix_store=next_store)
        with (
            nginx(next_image.parent, ctx.scratch / "nginx") as server,
            Relay(target=("127.0.0.1", server.port), link=ctx.link) as relay,
        ):
            yield _OcixfsSession(next_ctx, relay, server.requests, warm_cache=False,
                                 prefetch=None if self.mode == "borrowed" else "none",
                                 seed_cache=seed)


@contextlib.contextmanager
def packed(ctx: SessionContext, profile: Path) -> Iterator[None]:
    """The profile's pack in the session's store, as a publisher makes it (``ocixfs profile
    pack``; ``build --profile-cmd`` does the same), removed at the end so that no other
    contender plays it."""
    assert ctx.ocix_image is not None and ctx.ocix_store is not None
    result = subprocess.run(
        [ctx.ocixfs, "profile", "pack", profile, "--image", ctx.ocix_image, "--store",
         ctx.ocix_store, "--json"], capture_output=True, timeout=MOUNT_TIMEOUT, check=True)
    parts = [ctx.ocix_store / part["name"] for part in json.loads(result.stdout)["parts"]]
    try:
        yield
    finally:
        for part in parts:
            part.unlink(missing_ok=True)


@contextlib.contextmanager
def recorded_beside(ctx: SessionContext) -> Iterator[Path]:
    """``IMAGE.profile`` beside the session's manifest, made by ``ocixfs profile record``
    of the workload from the local image and store (own cache: the timed runs start
    empty), and removed at the end so no other contender plays it."""
    assert ctx.ocix_image is not None and ctx.ocix_store is not None
    profile = ctx.ocix_image.with_name(ctx.ocix_image.name + ".profile")
    if profile.exists():
        raise RuntimeError(f"{profile} exists: left by an interrupted session? remove it")
    try:
        run_logged(record_argv(ctx, profile), ctx.log, timeout=WORKLOAD_TIMEOUT + MOUNT_TIMEOUT)
        if not profile.is_file():
            raise RuntimeError("ocixfs profile record wrote no profile")
        yield profile
    finally:
        profile.unlink(missing_ok=True)


def record_argv(ctx: SessionContext, profile: Path) -> list[str | Path]:
    """The ``ocixfs profile record`` command of the session's workload (strict: a
    workload that fails makes no profile)."""
    assert ctx.ocix_image is not None and ctx.ocix_store is not None
    return [ctx.ocixfs, "profile", "record", ctx.ocix_image, "--store", ctx.ocix_store,
            "--cache-dir", ctx.scratch / "record-cache", "-o", profile, "--strict",
            "--timeout", str(WORKLOAD_TIMEOUT), "--", *ctx.spec.workload.argv]


def unmount_ocixfs(ctx: SessionContext, mnt: Path) -> None:
    """`ocixfs umount` (which writes a recorded profile), then make sure it is gone."""
    try:
        run_logged([ctx.ocixfs, "umount", mnt], ctx.log, timeout=MOUNT_TIMEOUT)
    finally:
        unmount(mnt, ctx.log)


def run_locally(ctx: SessionContext, cache: Path) -> None:
    """One untimed run of the workload from the local image and store into ``cache`` as
    it is (the daemon keeps its host profile there at unmount)."""
    assert ctx.ocix_image is not None and ctx.ocix_store is not None
    mnt = fresh_dir(ctx.scratch / "mnt")
    argv: list[str | Path] = [ctx.ocixfs, "mount", ctx.ocix_image, mnt, "--store", ctx.ocix_store,
                              "--cache-dir", cache, "--log-file", ctx.scratch / "daemon.log"]
    run_logged(argv, ctx.log, timeout=MOUNT_TIMEOUT)
    try:
        wait_until(lambda: is_mounted(mnt), MOUNT_TIMEOUT, "ocixfs mount")
        run_workload(ctx, mnt)
    finally:
        unmount_ocixfs(ctx, mnt)


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (SkopeoUmoci(), Casync(), Ocixfs("cold"), Ocixfs("ondemand"), Ocixfs("profile"),
              Ocixfs("recorded"),
              Ocixfs("borrowed"), Ocixfs("next-ondemand"), Ocixfs("predict"), Ocixfs("warm"),
              Ocixfs("warm-fresh"), Ocixfs("warm-fresh-fuse"))
}
