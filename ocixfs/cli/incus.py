"""``ocixfs incus``: Incus containers whose root filesystem is fetched on demand.

``create`` makes an empty Incus container and ``prepare``s it; ``prepare`` writes the
``raw.lxc`` block (overlay root over the shared image mount, two hooks); ``hook`` is what
LXC runs before start and after stop (see ``ocixfs.mount.incus``). Everything else (start, stop,
restart, snapshot, delete) is plain ``incus``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.mount.incus import ImageSpec

NAME = "incus"
HELP = "Incus containers whose root is an overlay on a shared, lazily fetched ocixfs mount"
DESCRIPTION = """\
Run Incus containers whose root filesystem is fetched on demand: an overlay of the image
(one ocixfs mount per image on this host, shared by all its instances, mounted before the
first one starts and unmounted after the last one stops) and the instance's own rootfs
directory in its storage volume, which receives its writes.

  ocixfs incus create NAME IMAGE [--store URL]… [--privileged] [-c KEY=VALUE]… [--start]
      'incus create --empty NAME …', then 'prepare'
  ocixfs incus prepare NAME IMAGE [--store URL]…
      (re)write the raw.lxc of an existing, stopped instance (after a rename, a copy or a
      change of security.privileged)

Then use incus as usual: incus start/stop/restart/exec/snapshot/delete NAME.

examples:
  ocixfs incus create web1 /srv/images/debian.ocix --store https://blobs.example.org/store/ --start
  ocixfs incus create web2 /srv/images/debian.ocix --store https://blobs.example.org/store/ \\
      --privileged -c limits.memory=1GiB
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="incus_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create an empty Incus container and prepare it",
                            description="'incus create --empty NAME [-c …] [-p …] [-s …]', "
                            "then 'ocixfs incus prepare NAME IMAGE'.")
    _instance_arguments(create)
    create.add_argument("--privileged", action="store_true",
                        help="a privileged container (-c security.privileged=true)")
    create.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                        help="instance configuration, as for incus create (repeat)")
    create.add_argument("-p", "--profile", action="append", default=[], metavar="PROFILE",
                        help="profile to apply, as for incus create (repeat)")
    create.add_argument("-s", "--storage", metavar="POOL", help="storage pool (a 'dir' pool "
                        "is what this was tested with)")
    create.add_argument("--start", action="store_true", help="start it too")
    prepare = sub.add_parser("prepare", help="write the raw.lxc of an existing, stopped "
                             "instance created with --empty")
    _instance_arguments(prepare)
    hook = sub.add_parser("hook", help="(run by LXC) mount/release the image around a start")
    hook.add_argument("hook_type", choices=["pre-start", "post-stop"], metavar="TYPE")
    _image_arguments(hook)
    hook.add_argument("--lower", type=Path, required=True)
    hook.add_argument("--upper", type=Path, required=True)
    hook.add_argument("--uid-shift", type=int, default=0)
    hook.add_argument("--gid-shift", type=int, default=0)


def _instance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the Incus instance")
    _image_arguments(parser)
    parser.add_argument("--ocixfs", metavar="COMMAND",
                        help="how the hooks run ocixfs (default: this ocixfs, by absolute path)")


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="manifest file or http(s) URL")
    parser.add_argument("--store", action="append", default=[], metavar="URL",
                        help="blob store; repeat for mirrors")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="the cache (default: the host's shared cache)")
    parser.add_argument("--digest", metavar="b3:HEX", help="pin the image to this digest")
    parser.add_argument("--prefetch", default="none", metavar="none|auto|all|FILE",
                        help="what the shared mount fetches before it is read (default none: "
                        "only what containers read)")


def run(args: argparse.Namespace) -> int:
    if args.incus_command == "hook":
        return _run_hook(args)
    if args.incus_command == "create":
        return _create(args)
    _prepare(args)
    return 0


# -- create / prepare ---------------------------------------------------------------------------


def _incus(*args: str, stdin: str | None = None) -> str:
    from ocixfs.errors import OcixError

    try:
        result = subprocess.run(["incus", *args], capture_output=True, text=True, input=stdin,
                                timeout=300)
    except FileNotFoundError:
        raise OcixError("incus is not installed") from None
    if result.returncode != 0:
        message = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise OcixError(f"incus {args[0]}: {message or 'failed'}")
    return result.stdout


def _create(args: argparse.Namespace) -> int:
    incus_args = [arg for item in args.config for arg in ("-c", item)]
    incus_args += [arg for item in args.profile for arg in ("-p", item)]
    if args.privileged:
        incus_args += ["-c", "security.privileged=true"]
    if args.storage is not None:
        incus_args += ["-s", args.storage]
    _incus("create", "--empty", args.name, *incus_args)
    try:
        _prepare(args)
    except BaseException:
        subprocess.run(["incus", "delete", "--force", args.name], capture_output=True)
        raise
    if args.start:
        _incus("start", args.name)
    return 0


def _prepare(args: argparse.Namespace) -> None:
    from ocixfs.errors import OcixError, UsageError
    from ocixfs.mount.incus import IdShift, idshift_from_volatile, merge_raw_lxc, mount_dir, raw_lxc

    spec = _spec(args)
    info = json.loads(_incus("query", f"/1.0/instances/{args.name}"))
    if info.get("type") != "container":
        raise UsageError(f"{args.name}: a {info.get('type')}, not a container")
    if info.get("status") != "Stopped":
        raise UsageError(f"{args.name}: stop it first (it is {info.get('status')})")
    project = info.get("project") or "default"
    config = info.get("config", {})
    expanded = info.get("expanded_config", {})
    if expanded.get("security.privileged") in ("true", "1"):
        shift = IdShift()
    else:
        shift = idshift_from_volatile(config.get("volatile.idmap.next"))
        if shift.privileged:
            raise OcixError(f"{args.name}: unprivileged, but Incus has no idmap for it yet")
    instance_dir = _incus_dir() / "containers" / (
        args.name if project == "default" else f"{project}_{args.name}")
    upper = Path(os.path.realpath(instance_dir)) / "rootfs"
    lower = mount_dir(spec, shift)
    hook_args = [*_image_argv(spec), "--lower", os.fspath(lower), "--upper", os.fspath(upper),
                 "--uid-shift", str(shift.uid), "--gid-shift", str(shift.gid)]
    block = raw_lxc(lower=lower, upper=upper, shift=shift,
                    hook=[*_hook_command(args), "incus", "hook"], hook_args=hook_args)
    text = merge_raw_lxc(config.get("raw.lxc", ""), block)
    _incus("config", "set", args.name, "raw.lxc", text)


def _spec(args: argparse.Namespace) -> ImageSpec:
    from ocixfs.image.loading import is_url
    from ocixfs.mount.incus import ImageSpec
    from ocixfs.store.spec import normalize_store

    image = args.image if is_url(args.image) else os.path.abspath(args.image)
    return ImageSpec(
        image=image,
        stores=tuple(normalize_store(s) for s in args.store),
        cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir is not None else None,
        digest=args.digest,
        prefetch=args.prefetch if args.prefetch in ("none", "auto", "all")
        else os.path.abspath(args.prefetch),
    )


def _image_argv(spec: ImageSpec) -> list[str]:
    argv = [spec.image]
    for store in spec.stores:
        argv += ["--store", store]
    if spec.cache_dir is not None:
        argv += ["--cache-dir", spec.cache_dir]
    if spec.digest is not None:
        argv += ["--digest", spec.digest]
    return [*argv, "--prefetch", spec.prefetch]


def _incus_dir() -> Path:
    return Path(os.environ.get("INCUS_DIR", "/var/lib/incus"))


def _hook_command(args: argparse.Namespace) -> list[str]:
    import shlex

    if args.ocixfs:
        return shlex.split(args.ocixfs)
    script = Path(sys.argv[0])
    if script.name == "ocixfs" and script.is_file():
        return [os.path.abspath(script)]
    return [sys.executable, "-m", "ocixfs"]


# -- hook ---------------------------------------------------------------------------------------


def _run_hook(args: argparse.Namespace) -> int:
    from ocixfs.errors import OcixError
    from ocixfs.mount.incus import HookContext, IdShift, post_stop, pre_start

    hook_type = args.hook_type
    ctx = HookContext.from_environment()
    spec = _spec(args)
    ocixfs = _hook_command(argparse.Namespace(ocixfs=None))
    lower = Path(os.path.abspath(args.lower))
    try:
        if hook_type == "pre-start":
            pre_start(ctx, spec=spec, lower=lower, upper=Path(os.path.abspath(args.upper)),
                      shift=IdShift(args.uid_shift, args.gid_shift), ocixfs=ocixfs)
        else:
            post_stop(ctx, lower=lower, ocixfs=ocixfs)
    except OcixError as exc:
        ctx.report(f"{hook_type}: {exc}")
        return 1
    except OSError as exc:
        ctx.report(f"{hook_type}: {exc}")
        return 1
    return 0

