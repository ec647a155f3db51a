"""``ocixfs mount``: validate an image and serve it at a mountpoint."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.cache.index import LoadedTree
    from ocixfs.config import CacheQuota, FetchConfig
    from ocixfs.image.loading import PinnedBytes
    from ocixfs.mount.config import MountConfig
    from ocixfs.mount.profile import Profile
    from ocixfs.mount.startup import LoadedImage, PlanSeen
    from ocixfs.store.spec import StoreSpec

NAME = "mount"
HELP = "mount an image read-only, fetching file contents lazily"
DESCRIPTION = """\
Mount IMAGE (a local .ocix file or an http(s) URL) read-only at MOUNTPOINT.

The manifest is downloaded (if a URL), pinned (--digest) and validated before anything is
mounted. File contents are fetched from the blob store(s) only when first read, verified
against their BLAKE3 hash and kept in the local cache, which every mount on the host shares.

Without --foreground the command returns once the mount serves requests (exit 0) or has
failed (exit 1 with the reason), leaving a daemon in the background; as root, the work is
done by the host service ('ocixfs service', started on first use), which makes it fast.
With --foreground it stays attached and tells systemd (NOTIFY_SOCKET) when it is ready.
SIGTERM or SIGINT, or 'ocixfs umount MOUNTPOINT', unmount cleanly.

examples:
  ocixfs mount debian.ocix /mnt/root --store https://blobs.example.org/store/
  ocixfs mount https://example.org/images/app.ocix /mnt/app \\
      --digest b3:3f1c… --store https://cdn-a/store/ --store https://cdn-b/store/
"""

FUSE_FLAGS = {"suid", "nosuid", "dev", "nodev", "allow_other", "ro", "rw", "default_permissions",
              "exec", "noexec", "atime", "noatime", "nodiratime", "relatime", "auto", "noauto",
              "nofail", "_netdev", "user", "nouser", "users", "defaults", "nonempty",
              "nopacks", "fuseonly"}
KERNEL_FLAGS = {"exec", "noexec", "atime", "noatime", "nodiratime"}
# How long each network step of the first look at a store may take (it holds up no mount:
# a store that has not answered when the mount is ready is logged when it does).
STORE_PROBE_TIMEOUT = 2.0
VALUE_OPTIONS = {"store", "cache", "cache_dir", "digest", "deadline", "log", "prefetch",
                 "store_auth", "ca_file", "timeout", "cache_max_size", "uidshift", "gidshift",
                 "proxy"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="manifest file, http(s) URL, or "
                        "docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX] (pushed by ocixfs push)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                        help="an empty directory (-o nonempty: or one whose contents the "
                        "mount may hide)")
    parser.add_argument("--store", action="append", default=[], metavar="URL",
                        help="blob store (http(s)://, file://, docker://, or a directory); "
                        "repeat for mirrors, tried in order (default: the manifest's directory)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="local cache shared by all mounts (default /var/cache/ocixfs as "
                        "root, else $XDG_CACHE_HOME/ocixfs)")
    parser.add_argument("--cache-max-size", metavar="SIZE",
                        help="quota of the cache: 10G, 500M, 20%% (of its filesystem) or "
                        "unlimited; least recently used blobs are evicted beyond it (default "
                        "10%% of the filesystem, at most 20G; also -o cache_max_size=SIZE)")
    parser.add_argument("--digest", metavar="b3:HEX",
                        help="refuse a manifest with another hash; one the image index "
                        "holds is mounted without asking the server")
    parser.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS",
                        help="a read that cannot be served within this time fails with EIO "
                        "(default 30)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="per attempt: how long connecting, or a stalled transfer, may take "
                        "before the next mirror is tried (default 5 to connect, 10 to read)")
    parser.add_argument("--store-auth", metavar="FILE",
                        help="credentials for the stores (and an http(s) IMAGE), one per line: "
                        "'URL bearer TOKEN' or 'URL basic USER:PASSWORD', sent only to URLs "
                        "under URL; netrc ($NETRC or ~/.netrc) is used too")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="PEM CA certificates to trust in addition to the system's")
    parser.add_argument("--proxy", action="append", default=[], metavar="URL",
                        help="HTTP proxy (site cache) for stores and http(s) IMAGE: "
                        "http://HOST:PORT, or DIRECT for none; repeat for an ordered group, "
                        "a failed proxy is skipped for a minute (default: HTTP_PROXY, "
                        "HTTPS_PROXY, NO_PROXY from the environment; also -o proxy=URL)")
    parser.add_argument("--tls-verify", choices=("true", "false"), default="true",
                        help="for docker:// IMAGE and stores: false allows plain http to a "
                        "registry that is not on this host (default true: https)")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (for systemd Type=notify)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="comma-separated mount options: suid, dev (honour setuid bits "
                        "and device nodes; off by default), allow_other, nonempty, noexec, "
                        "noatime and the other generic flags; store=URL, cache=DIR (or "
                        "cache_dir=DIR), cache_max_size=SIZE, digest=b3:HEX, "
                        "deadline=SECONDS, timeout=SECONDS, prefetch=auto|none|all|FILE, "
                        "log=FILE, store_auth=FILE, ca_file=FILE, proxy=URL, uidshift=N, "
                        "gidshift=N (add N to every owner / group: an unprivileged "
                        "container's id base); x-* and comment=* are ignored (fstab); "
                        "nopacks: see --no-packs; fuseonly: see --fuse-only")
    parser.add_argument("--prefetch", default="auto", metavar="auto|none|all|FILE",
                        help="what to fetch before it is read: 'auto' plays the profile beside "
                        "the manifest (IMAGE.profile), else the one this host recorded, else "
                        "the one it recorded for the most similar image, else the ELF "
                        "libraries of each program as it starts; 'all' does "
                        "that, then fetches the rest of the image; FILE plays that profile")
    parser.add_argument("--no-packs", action="store_true",
                        help="fetch the profile's files one by one even when the store has "
                        "profile packs for it (made by 'ocixfs profile pack'; by default a "
                        "profiled mount fetches them, one request per pack)")
    parser.add_argument("--prefetch-concurrency", type=int, default=16, metavar="N",
                        help="blobs fetched at once in the background (default 16)")
    parser.add_argument("--record-profile", type=Path, metavar="FILE",
                        help="write the access profile of this mount to FILE at unmount")
    parser.add_argument("--log-file", type=Path, metavar="FILE",
                        help="where the background daemon logs (default: the runtime dir)")
    parser.add_argument("--fuse-only", action="store_true",
                        help="serve names, attributes and listings through FUSE too. By "
                        "default a mount made by root on Linux 6.12 or later is an overlay "
                        "of the image's EROFS metadata image (kept in the cache) over its "
                        "FUSE mount: the kernel answers lookups, stat, readdir and readlink "
                        "itself, and only file contents are read through FUSE")
    parser.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    parser.add_argument("--no-service", action="store_true",
                        help="mount in this process, not through the host service (root's "
                        "mounts go through it by default; also OCIXFS_NO_SERVICE=1)")


def parse_mount_options(text: list[str]) -> tuple[set[str], dict[str, list[str]]]:
    """Split ``-o`` strings into flags and ``key=value`` pairs; ``x-*`` options are ignored."""
    from ocixfs.errors import UsageError

    flags: set[str] = set()
    values: dict[str, list[str]] = {}
    for group in text:
        for option in filter(None, group.split(",")):
            key, sep, value = option.partition("=")
            if key.startswith(("x-", "comment")):
                continue
            if sep and key in VALUE_OPTIONS:
                values.setdefault(key, []).append(value)
            elif not sep and key in FUSE_FLAGS:
                flags.add(key)
            else:
                raise UsageError(f"unknown mount option {option!r}")
    if "rw" in flags:
        raise UsageError("ocixfs mounts are read-only; option 'rw' is not supported")
    return flags, values


def run(args: argparse.Namespace) -> int:
    """Through the host service when it takes the mount (root, in the background; ``main``
    asks it before anything is parsed, so ``service_asked`` means it declined), else
    here."""
    if not (args.foreground or args.no_service or args.service_asked) and os.geteuid() == 0:
        from ocixfs.mount.serviceclient import mount_through_service

        status = mount_through_service(args.command_line)
        if status is not None:
            return status
    from dataclasses import replace

    from ocixfs.image.loading import check_digest
    from ocixfs.mount.daemon import run_background, run_foreground

    flags, values = parse_mount_options(args.options)
    digest = _last(values, "digest", args.digest)
    if digest is not None:
        digest = check_digest(digest)
    fetch = _fetch_config(args, values)
    config = _mount_config(args, flags, values, fetch)  # every option checked: nothing slow yet
    _check_cache_directory(config.cache_dir)
    prefetch: str = values["prefetch"][-1] if "prefetch" in values else args.prefetch
    named = _named_profile(prefetch)
    config = replace(config, fill_rest=prefetch == "all", predict=prefetch in ("auto", "all"))
    loader = partial(_load, config.image, digest, config.reader.fetch, prefetch, named,
                     config.cache_dir, config.stores, tls_verify=args.tls_verify == "true")
    if args.foreground:
        return run_foreground(config, loader)
    return run_background(config, loader)


def _named_profile(prefetch: str) -> Profile | None:
    """The profile ``--prefetch FILE`` names, read now (a missing or broken one is an
    error before anything starts); None for the other modes."""
    from ocixfs.mount.profile import read_named_profile

    return None if prefetch in ("auto", "all", "none") else read_named_profile(Path(prefetch))


def _check_cache_directory(cache_dir: Path) -> None:
    """Make the cache directory, or refuse it (one line), before anything reads or writes in
    it: the image index is the first to, while the manifest loads."""
    from ocixfs.cache.layout import cache_errors
    from ocixfs.safefs import private_directory

    with cache_errors(f"preparing {cache_dir}"):
        private_directory(cache_dir, what="cache directory")


def _last(values: dict[str, list[str]], name: str, given: str | None) -> str | None:
    """A command-line value, else the last ``-o name=value``, else None."""
    return given if given is not None else (values[name][-1] if name in values else None)


def _mount_config(
    args: argparse.Namespace, flags: set[str], values: dict[str, list[str]], fetch: FetchConfig
) -> MountConfig:
    """The daemon's settings from the options (the profile comes later, with the image);
    a mistake is a ``UsageError`` before anything is downloaded."""
    from dataclasses import replace

    from ocixfs.config import CacheConfig, ReaderConfig, default_cache_dir
    from ocixfs.errors import UsageError
    from ocixfs.image.loading import is_url
    from ocixfs.mount.config import MountConfig
    from ocixfs.mount.daemon import check_mountpoint
    from ocixfs.mount.fromregistry import with_logins
    from ocixfs.store.spec import is_registry_ref, stores_or_default

    stores = with_logins(stores_or_default([*args.store, *values.get("store", [])], args.image),
                         tls_verify=args.tls_verify == "true")
    cache_values = values.get("cache", []) + values.get("cache_dir", [])
    cache_dir = args.cache_dir or (Path(cache_values[-1]) if cache_values else default_cache_dir())
    deadline = float(values["deadline"][-1]) if "deadline" in values else args.deadline
    if deadline <= 0:
        raise UsageError("--deadline must be positive")
    mountpoint = Path(os.path.abspath(args.mountpoint))
    check_mountpoint(mountpoint, nonempty="nonempty" in flags)
    log = _last(values, "log", None)
    log_file = args.log_file or (Path(log) if log is not None else None)
    default_log = log_file is None and not args.foreground
    if default_log:
        log_file = _default_log_file(mountpoint)
    # Prefetch workers each need a background slot to keep that many fetches in flight;
    # on-demand reads keep their own slots, so this never delays them.
    fetch = replace(fetch, deadline=deadline, background_slots=max(
        fetch.background_slots, args.prefetch_concurrency))
    return MountConfig(
        image=(args.image if is_url(args.image) or is_registry_ref(args.image)
               else os.path.abspath(args.image)),
        mountpoint=mountpoint,
        stores=tuple(stores),
        cache_dir=Path(os.path.abspath(cache_dir)),  # the daemon runs in /
        reader=ReaderConfig(cache=CacheConfig(quota=_cache_quota(args, values)), fetch=fetch),
        kernel_flags=frozenset(flags & KERNEL_FLAGS),
        suid="suid" in flags,
        dev="dev" in flags,
        allow_other=os.geteuid() == 0 or "allow_other" in flags,
        fsname=_fsname(args.image),
        log_file=log_file,
        remove_routine_log=default_log,
        debug_fuse=args.debug_fuse,
        record_profile=Path(os.path.abspath(args.record_profile)) if args.record_profile else None,
        prefetch_concurrency=args.prefetch_concurrency,
        packs=not args.no_packs and "nopacks" not in flags,
        uid_shift=_id_shift(values, "uidshift"),
        gid_shift=_id_shift(values, "gidshift"),
        stack=_stacks(args, flags),
    )


def _stacks(args: argparse.Namespace, flags: set[str]) -> bool:
    """Whether the kernel serves the mount's metadata (``mount.stacking``): as root, unless
    told otherwise, on a kernel that can."""
    if args.fuse_only or "fuseonly" in flags or os.geteuid() != 0:
        return False
    from ocixfs.mount.stacking import kernel_can_stack

    return kernel_can_stack()


def _id_shift(values: dict[str, list[str]], name: str) -> int:
    from ocixfs.errors import UsageError

    text = values[name][-1] if name in values else "0"
    if not text.isdigit() or int(text) > 2**32 - 2**16:
        raise UsageError(f"{name}={text}: not an id base (0 to {2**32 - 2**16})")
    return int(text)


def _load(
    source: str, digest: str | None, fetch: FetchConfig, prefetch: str,
    named: Profile | None, cache_dir: Path, stores: Sequence[StoreSpec],
    plan_seen: PlanSeen, *, tls_verify: bool,
) -> LoadedImage:
    """The image, its inode tree and the profile to play (``named``, for ``--prefetch
    FILE``; else found by ``locate_profile``, borrowed from a related image this host ran
    when there is no other), run by the mount daemon as it starts (``mount.startup``).
    The manifest (and a profile beside it) download and decode in worker threads, and the
    stores are probed in others (``StoreChecks``, reported once the mount is ready).
    ``plan_seen`` hears of the profile's pack plan as soon as the profile is known, before
    the manifest has arrived.

    When the manifest cannot be loaded its one-line error is all that is said (what the
    profile lookup found is held back and dropped); otherwise a store that did not answer
    is one warning line, and the mount goes on (what is cached still works).
    An image in a registry brings its profile, and the stores that name it come back
    pinned to the artifact's digest (``mount.fromregistry``)."""
    from ocixfs.mount.profile import locate_profile, profile_beside
    from ocixfs.mount.startup import LoadedImage, StoreChecks
    from ocixfs.store.spec import is_registry_ref

    if named is not None and named.pack:
        plan_seen(named.pack)
    probed = tuple(stores)
    checks = StoreChecks([store.label for store in probed],
                         lambda index: _probe_store(probed[index], fetch))
    with (
        _held_warnings("ocixfs.mount.profile") as release,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="ocixfs-load") as pool,
    ):
        if is_registry_ref(source):
            loading = pool.submit(_load_registry_tree, source, digest, fetch, cache_dir,
                                  stores, tls_verify)
            beside = None
        else:
            loading = pool.submit(_load_tree, source, digest, fetch, cache_dir, stores)
            beside = (pool.submit(profile_beside, source, fetch, cache_dir)
                      if prefetch in ("auto", "all") else None)
            if beside is not None:
                beside.add_done_callback(partial(_tell_plan, plan_seen))
        image, loaded, found, stores = loading.result()
        release()
        profile = locate_profile(prefetch, source, cache_dir, image.digest, fetch, named=named,
                                 beside=beside.result if beside is not None else lambda: found,
                                 tree=loaded.tree)
    return LoadedImage(image.digest, loaded.tree, profile, tuple(stores), loaded.from_index,
                       store_checks=checks)


def _tell_plan(plan_seen: PlanSeen, beside: Future[Profile | None]) -> None:
    """``plan_seen`` the pack plan of the profile found beside the manifest, if it has one."""
    if beside.exception() is None:
        found = beside.result()
        if found is not None and found.pack:
            plan_seen(found.pack)


def _probe_store(store: StoreSpec, fetch: FetchConfig) -> str | None:
    from ocixfs.store.remote import probe

    return probe(store, fetch, timeout=STORE_PROBE_TIMEOUT)


@contextmanager
def _held_warnings(logger_name: str) -> Iterator[Callable[[], None]]:
    """Hold back what ``logger_name`` logs until the caller calls the function it yields
    (then the held records are logged, and later ones go straight through); records still
    held at the end are dropped."""
    logger = logging.getLogger(logger_name)
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    def release() -> None:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)
        held.clear()

    logger.addFilter(hold)
    try:
        yield release
    finally:
        logger.removeFilter(hold)


def _load_tree(
    source: str, digest: str | None, fetch: FetchConfig, cache_dir: Path,
    stores: Sequence[StoreSpec],
) -> tuple[PinnedBytes, LoadedTree, Profile | None, Sequence[StoreSpec]]:
    from ocixfs.image.loading import is_url

    if is_url(source):
        return *_load_url(source, digest, fetch, cache_dir), None, stores
    return *_load_file(source, digest, fetch, cache_dir), None, stores


def _load_file(path: str, digest: str | None, fetch: FetchConfig,
               cache_dir: Path) -> tuple[PinnedBytes, LoadedTree]:
    """A manifest file, not even read when it is the version (``file_version``) this host
    last read under that name and its tree is in the image index; else read, checked
    against ``digest``, and remembered when the file did not change while it was read."""
    import time

    from ocixfs.cache.index import open_tree
    from ocixfs.cache.manifests import KnownDocument, file_version, recall, remember
    from ocixfs.image.loading import read_pinned

    key = Path(os.path.abspath(path)).as_uri()
    version = file_version(path)
    known = recall(cache_dir, key) if version is not None else None
    if known is not None and known.validators == version and digest in (None, known.digest):
        found = _from_index(path, os.path.basename(path) or path, known.digest, cache_dir)
        if found is not None:
            return found
    image = read_pinned(path, expected_digest=digest, http=fetch)
    if version is not None and file_version(path) == version:
        remember(cache_dir, key, KnownDocument(image.digest, version, time.time()))
    return image, open_tree(image.data, image.digest, cache_dir, source=image.name)


def _load_url(url: str, digest: str | None, fetch: FetchConfig,
              cache_dir: Path) -> tuple[PinnedBytes, LoadedTree]:
    """A manifest URL, without asking the server when the manifest is pinned (``digest``)
    to one in the image index, or was received from this URL and is still fresh; else
    downloaded only if it changed since the last download on this host
    (``cache.manifests``) whose tree is in the image index; else whole."""
    import time

    from ocixfs.cache.index import open_tree
    from ocixfs.cache.manifests import ABSENT, KnownDocument, recall, refresh, remember
    from ocixfs.http import download_if_changed, redact, refuse_credentials
    from ocixfs.image.format import DEFAULT_LIMITS
    from ocixfs.image.loading import pin

    def indexed(known_digest: str) -> tuple[PinnedBytes, LoadedTree] | None:
        return _from_index(url, redact(url), known_digest, cache_dir)

    refuse_credentials(url, "IMAGE")
    known = recall(cache_dir, url)
    if known is not None and (known.digest == ABSENT or digest not in (None, known.digest)):
        known = None
    current = digest or (known.digest if known is not None and known.fresh() else None)
    found = indexed(current) if current is not None else None
    if found is not None:
        return found
    asked = time.time()
    data, validators = download_if_changed(url, known.validators if known else None,
                                           config=fetch, max_bytes=DEFAULT_LIMITS.max_bytes)
    if data is None:
        assert known is not None  # not modified: the manifest last received
        found = indexed(known.digest)
        if found is not None:
            refresh(cache_dir, url, known, validators, asked)
            return found
        asked = time.time()
        data, validators = download_if_changed(url, None, config=fetch,
                                               max_bytes=DEFAULT_LIMITS.max_bytes)
        assert data is not None
    image = pin(data, url, expected_digest=digest)
    remember(cache_dir, url, KnownDocument(image.digest, validators, asked))
    return image, open_tree(image.data, image.digest, cache_dir, source=image.name)


def _from_index(source: str, name: str, digest: str,
                cache_dir: Path) -> tuple[PinnedBytes, LoadedTree] | None:
    """The manifest ``digest`` of ``source`` taken from the image index alone (its bytes
    are not needed: the tree is there), or None when the index does not hold it."""
    from ocixfs.cache.index import LoadedTree, indexed_tree
    from ocixfs.image.loading import PinnedBytes

    tree = indexed_tree(digest, cache_dir)
    if tree is None:
        return None
    return PinnedBytes(source, name, digest, b""), LoadedTree(tree, from_index=True)


def _load_registry_tree(
    source: str, digest: str | None, fetch: FetchConfig, cache_dir: Path,
    stores: Sequence[StoreSpec], tls_verify: bool,
) -> tuple[PinnedBytes, LoadedTree, Profile | None, Sequence[StoreSpec]]:
    from ocixfs.cache.index import open_tree
    from ocixfs.mount.fromregistry import load_from_registry

    loaded = load_from_registry(source, digest, fetch, stores, tls_verify=tls_verify)
    image = loaded.image
    tree = open_tree(image.data, image.digest, cache_dir, source=image.name)
    return image, tree, loaded.profile, loaded.stores


DAEMON_MODULES = ("ocixfs.fetch.reader", "ocixfs.mount.fs", "ocixfs.mount.session")


def _fetch_config(args: argparse.Namespace, values: dict[str, list[str]]) -> FetchConfig:
    """Network settings from the options. The CA and credentials files are read now, once
    (a mistake in one is reported before anything is downloaded); every client of this
    mount, before and after the fork, uses what was read."""
    from dataclasses import replace

    from ocixfs.config import FetchConfig
    from ocixfs.errors import UsageError
    from ocixfs.http import load_credentials, proxy_group, ssl_context

    fetch = FetchConfig(
        ca_file=_last(values, "ca_file", args.ca_file),
        auth_file=_last(values, "store_auth", args.store_auth),
        proxies=proxy_group([*args.proxy, *values.get("proxy", [])]),
    )
    ssl_context(fetch.ca_file)
    fetch = replace(fetch, credentials=load_credentials(fetch.auth_file))
    timeout = _last(values, "timeout", None if args.timeout is None else str(args.timeout))
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            raise UsageError(f"--timeout {timeout}: not a number") from None
        if not seconds > 0:
            raise UsageError("--timeout must be positive")
        fetch = replace(fetch, connect_timeout=seconds, read_timeout=seconds)
    return fetch


def _cache_quota(args: argparse.Namespace, values: dict[str, list[str]]) -> CacheQuota:
    from ocixfs.cache.sizes import parse_quota
    from ocixfs.config import CacheQuota

    spec = args.cache_max_size or (values["cache_max_size"][-1] if "cache_max_size" in values
                                   else None)
    return CacheQuota() if spec is None else parse_quota(spec)


def _default_log_file(mountpoint: Path) -> Path:
    from ocixfs.mount.runtime import mount_id, runtime_dir

    return runtime_dir(create=True) / f"{mount_id(mountpoint)}.log"


def _fsname(image: str) -> str:
    """The mount source shown by mount(8) and df: the image name (never credentials from
    its URL), made option-safe."""
    from ocixfs.http import redact

    name = redact(image).rstrip("/").rsplit("/", 1)[-1] or "ocixfs"
    return "".join(c if c.isalnum() or c in "._-:+@" else "_" for c in name)[:200]
