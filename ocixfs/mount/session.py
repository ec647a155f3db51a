"""One mounted image inside the daemon's trio run: wires tree, reader, Operations and the
control socket together, and guarantees the FUSE mount is gone when ``serve`` returns.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from ocixfs.cache.index import open_metadata_image, write_index, write_metadata_image
from ocixfs.errors import OcixError, leaf_exceptions
from ocixfs.fetch.reader import Reader, open_reader
from ocixfs.http import redact
from ocixfs.mount import fusetrio, kernelcache, stacking
from ocixfs.mount.control import ControlServer
from ocixfs.mount.fs import FsOptions, Operations
from ocixfs.mount.predict import ElfPredictor
from ocixfs.mount.prefetch import Prefetcher, plan
from ocixfs.mount.profile import AccessRecorder, cached_profile_path, save_profile
from ocixfs.mount.runtime import runtime_dir
from ocixfs.mount.stacking import Layers
from ocixfs.mount.startup import LoadedImage, PendingLoad, StoreChecks
from ocixfs.store.spec import is_registry_ref

if TYPE_CHECKING:
    from pathlib import Path

    from ocixfs.fetch.packs import PackPlayer
    from ocixfs.image.format import Chunk
    from ocixfs.image.tree import Tree
    from ocixfs.mount.config import MountConfig

__all__ = ["MountSession"]

log = logging.getLogger(__name__)

WARM_MAX_BYTES = 512 << 20  # of a start-up's cached files read ahead into memory
QUIET_SECONDS = 1.0  # no request for this long: the start-up is over (_keep_for_next_mount)
QUIET_WAIT_MAX = 30.0


class MountSession:
    """Load one image (``pending``) and serve it at one mountpoint until unmounted or
    signalled."""

    def __init__(self, config: MountConfig, pending: PendingLoad) -> None:
        self.config = config
        self.pending = pending
        self.started = time.monotonic()
        self.tree: Tree | None = None
        self.image_digest = ""
        self._early_plan: tuple[Chunk, ...] = ()
        self._startup: list[Chunk] = []
        self._ops: Operations | None = None
        self._reader: Reader | None = None
        self._recorder = AccessRecorder()
        self._prefetcher: Prefetcher | None = None
        self._predictor: ElfPredictor | None = None
        self._background_failures: Counter[str] = Counter()
        self._store_checks: StoreChecks | None = None
        self._stopped_by_signal = False
        self._metadata_image_missing = False
        self._next_mount_caches_written = False
        self.stacked = False

    async def serve(self, ready: Callable[[], None]) -> None:
        """Load the image, mount it, call ``ready`` once it serves, and serve until
        unmounted. When the stores do not depend on the image (not a registry image), the
        reader opens while the image loads, and a pack set the profile names is played
        at once (``mount.startup``)."""
        if is_registry_ref(self.config.image):
            self._loaded(await self.pending.result())
        async with AsyncExitStack() as stack:
            reader = await stack.enter_async_context(
                open_reader(self.config.stores, self.config.cache_dir, self.config.reader)
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            if self.tree is None:
                if self.config.packs and reader.packs is not None:
                    await nursery.start(self._play_early, reader.packs)
                self._loaded(await self.pending.result())
            await self._serve(reader, nursery, ready)
        log.info("%s: unmounted", self.config.mountpoint)

    @property
    def _tree(self) -> Tree:
        assert self.tree is not None, "used before the image is loaded"
        return self.tree

    def _loaded(self, image: LoadedImage) -> None:
        self.tree, self.image_digest = image.tree, image.digest
        self._store_checks = image.store_checks
        self.config = replace(self.config, profile=image.profile, stores=image.stores,
                              predict=self.config.predict and image.profile is None,
                              write_index=not image.from_index)

    async def _play_early(self, packs: PackPlayer,
                          *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Play the pack set the profile names as soon as it is known (at the latest
        when the image is loaded). Reports started once its blobs are in flight (or
        there is none), so that nothing asks for them one by one meanwhile."""
        self._early_plan = await self.pending.plan()
        if self._early_plan:
            await packs.play(self._early_plan, task_status=task_status)
        else:
            task_status.started()

    async def _serve(self, reader: Reader, nursery: trio.Nursery,
                     ready: Callable[[], None]) -> None:
        assert self.tree is not None
        self._prefetcher = self._make_prefetcher(reader)
        if self._startup:
            nursery.start_soon(self._guarded, "warm", self._warm_startup, reader)
        if self.config.predict:
            self._predictor = ElfPredictor(self.tree, reader)
        ops = Operations(self.tree, reader, access_log=_AccessLogs(self._recorder,
                                                                    self._predictor),
                         options=FsOptions(uid_shift=self.config.uid_shift,
                                           gid_shift=self.config.gid_shift))
        self._ops, self._reader = ops, reader
        control = self._control_server()
        listening = control.bind()
        to_stack = await self._to_stack()
        layers = to_stack.layers if to_stack is not None else None
        try:
            if layers is not None:
                layers.create()
            _fuse_mount(ops, self.config.mountpoint if layers is None else layers.data,
                        self.config.fuse_options())
        except BaseException:
            listening.close()
            control.path.unlink(missing_ok=True)
            if to_stack is not None:
                to_stack.close()
            raise
        try:
            nursery.start_soon(self._guarded, "control", control.serve, listening)
            nursery.start_soon(self._guarded, "signals", self._stop_on_signals)
            nursery.start_soon(self._announce_when_serving, ready, nursery, to_stack)
            await pyfuse3.main()
        finally:
            nursery.cancel_scope.cancel()
            if layers is None:
                pyfuse3.close(unmount=True)
            else:
                pyfuse3.close(unmount=False)
                self._release_stack(layers)
            self._save_profiles()
            self._write_next_mount_caches()

    def _release_stack(self, layers: Layers) -> None:
        """After a stacked session: the mount at the mountpoint is detached when the daemon
        stopped on its own (a signal; an unmount has already removed it), and the layers
        are gone in any case."""
        if self._stopped_by_signal:
            stacking.unstack(self.config.mountpoint)
        layers.remove()

    async def _guarded(
        self, name: str, task: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run a background task that must not take the mount down: an unexpected
        exception is logged once and counted (``stats``: ``background_failures``), and the
        task stops alone while the mount keeps serving. Cancellation passes through."""
        try:
            await task(*args)
        except Exception as exc:
            self._background_failures[name] += 1
            log.error("%s: %s stopped by an internal error (%s); the mount keeps serving",
                      self.config.mountpoint, name, _describe(exc))
            log.debug("%s failed", name, exc_info=exc)

    def _make_prefetcher(self, reader: Reader) -> Prefetcher | None:
        """A prefetcher for the profile's plan, or None when there is nothing to prefetch;
        ``self._startup`` becomes the profile's part of the plan."""
        assert self.tree is not None
        chosen = self.config.profile
        profile = chosen.profile if chosen is not None else None
        chunks = plan(self.tree, profile, fill_rest=self.config.fill_rest)
        if not chunks:
            return None
        if chosen is not None:
            log.info("%s: playing the profile %s", self.config.mountpoint, chosen.describe())
        if profile is not None:
            self._startup = plan(self.tree, profile, fill_rest=False)
        packed = self._startup if self.config.packs else []
        return Prefetcher(reader, chunks, concurrency=self.config.prefetch_concurrency,
                          packs=reader.packs, packed=packed,
                          playing=bool(packed) and tuple(packed) == self._early_plan)

    async def _warm_startup(self, reader: Reader) -> None:
        """Queue the disk reads of the start-up's cached files (the profile's, up to
        ``WARM_MAX_BYTES``), so that a start-up from a warm cache reads from memory."""
        chunks, total = [], 0
        for chunk in self._startup:
            total += chunk.size
            if total > WARM_MAX_BYTES:
                break
            chunks.append(chunk)
        await reader.warm(chunks)

    def _save_profiles(self) -> None:
        """Keep what this mount saw: for the next mount on this host, and where asked."""
        if not len(self._recorder):
            return
        recorded = self._recorder.profile()
        cached = cached_profile_path(self.config.cache_dir, self.image_digest)
        save_profile(cached, recorded)
        if self.config.record_profile is not None:
            save_profile(self.config.record_profile, recorded)

    async def _announce_when_serving(self, ready: Callable[[], None], nursery: trio.Nursery,
                                     to_stack: _ToStack | None) -> None:
        """Call ``ready`` once the mount answers (stacked first, if it is to be); then
        start the prefetcher and the predictor (their first steps, a look at the cache
        for every planned blob, would hold up the trio thread while the kernel's first
        requests wait) and keep the index of a tree decoded from its manifest."""
        if to_stack is None:
            await trio.to_thread.run_sync(_widen_read_ahead_once_served,
                                          self.config.mountpoint)
        else:
            await trio.to_thread.run_sync(self._stack_once_served, to_stack)
        if self._store_checks is not None:
            self._store_checks.report()
        ready()
        log.info("%s: serving %s", self.config.mountpoint, redact(self.config.image))
        if self._prefetcher is not None:
            nursery.start_soon(self._guarded, "prefetch", self._prefetcher.run)
        if self._predictor is not None:
            nursery.start_soon(self._guarded, "predict", self._predictor.run)
        if self.config.write_index or self._metadata_image_missing:
            await self._guarded("index", self._keep_for_next_mount)

    async def _keep_for_next_mount(self) -> None:
        """Once the mount has been quiet for ``QUIET_SECONDS`` (at the latest after
        ``QUIET_WAIT_MAX``), keep what the next mount of the image needs: the image index
        of a tree decoded from its manifest, and the metadata image if there was none.
        For 100,000 entries each costs about a second of CPU, which a start-up's
        requests would otherwise wait behind. A mount that ends first writes them as its
        daemon exits (``_serve``)."""
        deadline = trio.current_time() + QUIET_WAIT_MAX
        seen = -1
        while trio.current_time() < deadline:
            activity = self._activity()
            if activity == seen:
                break
            seen = activity
            await trio.sleep(QUIET_SECONDS)
        await trio.to_thread.run_sync(self._write_next_mount_caches)

    def _activity(self) -> int:
        """How many requests the mount has answered so far (near enough)."""
        assert self._ops is not None
        counts = self._ops.statistics()
        return (counts.reads + counts.lookups + counts.negative_lookups + counts.listings
                + counts.readlinks + counts.xattr_misses)

    def _write_next_mount_caches(self) -> None:
        """``_keep_for_next_mount``'s writes, once: a worker thread's, or the daemon's as it
        exits (blocking). The flag is taken before writing, so the two never both write."""
        if self._next_mount_caches_written:
            return
        self._next_mount_caches_written = True
        config = self.config
        if config.write_index:
            write_index(config.cache_dir, self.image_digest, self._tree)
        if self._metadata_image_missing:
            write_metadata_image(config.cache_dir, self.image_digest, self._tree,
                                 uid_shift=config.uid_shift, gid_shift=config.gid_shift)

    async def _to_stack(self) -> _ToStack | None:
        """What to stack over the FUSE mount: with ``config.stack``, the layers and this
        host's metadata image, if it has a good one; None otherwise (a mount that may
        stack but has no image writes one for the next mount)."""
        config = self.config
        if not config.stack:
            return None
        meta_fd = await trio.to_thread.run_sync(partial(
            open_metadata_image, config.cache_dir, self.image_digest,
            uid_shift=config.uid_shift, gid_shift=config.gid_shift,
            verified=runtime_dir() / "verified"))
        if meta_fd is None:
            self._metadata_image_missing = True
            return None
        return _ToStack(Layers.of(config.mountpoint, os.getpid()), meta_fd)

    def _stack_once_served(self, to_stack: _ToStack) -> None:
        """Once the FUSE mount answers, stack the metadata image over it at the mountpoint
        (``mount.stacking``). Blocking: a worker thread's."""
        _widen_read_ahead_once_served(to_stack.layers.data)
        config = self.config
        flags = stacking.mount_flags(config.kernel_flags, suid=config.suid, dev=config.dev)
        try:
            self.stacked = stacking.stack(to_stack.layers, to_stack.meta_fd, config.mountpoint,
                                          source=config.fsname, flags=flags)
        finally:
            os.close(to_stack.meta_fd)

    async def _stop_on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: %s, unmounting", self.config.mountpoint, signal.Signals(signum).name)
                self._stopped_by_signal = True
                pyfuse3.terminate()
                return

    def _control_server(self) -> ControlServer:
        control = ControlServer(self.config.mountpoint)
        control.register("pid", self._pid)
        control.register("stats", self._stats)
        control.register("counters", self._counters)
        control.register("profile", self._profile)
        control.register("prefetch", self._prefetch)
        return control

    async def _profile(self, _message: dict[str, Any]) -> dict[str, Any]:
        return {"entries": [list(entry) for entry in self._recorder.profile().entries]}

    async def _prefetch(self, _message: dict[str, Any]) -> dict[str, Any]:
        """The prefetcher's counters alone (cheap enough to poll; ``stats`` scans the cache)."""
        return {"prefetch": self._prefetcher.statistics().as_dict() if self._prefetcher else None}

    async def _pid(self, _message: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def _stats(self, message: dict[str, Any]) -> dict[str, Any]:
        """``counters``, and how much of the image is in the cache (a walk of the tree)."""
        present = await trio.to_thread.run_sync(self._local_presence)
        return {**await self._counters(message), "image_files": present}

    async def _counters(self, _message: dict[str, Any]) -> dict[str, Any]:
        """What the mount is and what it has counted; cheap (for metrics scrapes)."""
        assert self._ops is not None and self._reader is not None
        played = self.config.profile
        return {
            "mountpoint": os.fspath(self.config.mountpoint),
            "image": redact(self.config.image),
            "image_digest": self.image_digest,
            "stores": [store.label for store in self.config.stores],
            "cache_dir": os.fspath(self.config.cache_dir),
            "log_file": os.fspath(self.config.log_file) if self.config.log_file else None,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "fs": self._ops.statistics().as_dict(),
            "kernel_caching": {
                "listings": kernelcache.listings_cached(),
                "symlinks": kernelcache.symlinks_cached(),
                "metadata": self.stacked,
            },
            "reader": self._reader.statistics().as_dict(),
            "prefetch": self._prefetcher.statistics().as_dict() if self._prefetcher else None,
            "profile_files": len(self._recorder),
            "played_profile": played.as_dict() if played is not None else None,
            "predict": self._predictor.statistics().as_dict() if self._predictor else None,
            "background_failures": dict(self._background_failures),
        }

    def _local_presence(self) -> dict[str, int]:
        """How much of the image's content is already in the local cache (runs in a thread)."""
        assert self._reader is not None
        files = files_local = size = size_local = 0
        for node in self._tree.iter_files():
            files += 1
            size += node.size
            blobs = node.blobs
            if all(self._reader.is_cached(chunk) for chunk in blobs):
                files_local += 1
                size_local += node.size
        return {
            "files": files, "files_local": files_local, "bytes": size, "bytes_local": size_local
        }


@dataclass(frozen=True, slots=True)
class _ToStack:
    """A stacked mount's layers and the descriptor of its metadata image (``close``: give
    both up, when the FUSE mount failed)."""

    layers: Layers
    meta_fd: int

    def close(self) -> None:
        self.layers.remove()
        os.close(self.meta_fd)


class _AccessLogs:
    """Tells the recorder, and the predictor if any, of every first open."""

    def __init__(self, recorder: AccessRecorder, predictor: ElfPredictor | None) -> None:
        self._logs: tuple[AccessRecorder | ElfPredictor, ...] = (
            (recorder,) if predictor is None else (recorder, predictor))

    def note_access(self, node_path: str, ino: int) -> None:
        for access_log in self._logs:
            access_log.note_access(node_path, ino)


def _widen_read_ahead_once_served(mountpoint: Path) -> None:
    """Wait until the mount answers (a ``stat`` of it), then widen its read-ahead window
    (``kernelcache.read_ahead``). Blocking: a worker thread's."""
    kernelcache.read_ahead(os.stat(mountpoint).st_dev)


def _fuse_mount(ops: Operations, mountpoint: Path, options: set[str]) -> None:
    """``pyfuse3.init``, with what libfuse prints on stderr while it mounts (``fuse: failed
    to open /dev/fuse: Permission denied``) caught and turned into the one-line
    ``OcixError`` a failure raises; on success that text goes to the log."""
    kernelcache.enable(pyfuse3.__file__)
    fusetrio.install()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, os.fspath(mountpoint), options)
        except Exception as exc:
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = [line.strip() for line in captured.read(4096).decode(errors="replace").splitlines()]
    said = [line for line in said if line]
    if failure is None:
        for line in said:
            log.info("libfuse: %s", line)
        return
    reason = said[-1] if said else str(failure) or type(failure).__name__
    hint = "; mount as root or get read-write access to it" if "/dev/fuse" in reason else ""
    raise OcixError(f"{mountpoint}: cannot mount: {reason}{hint}") from None


def _describe(exc: BaseException) -> str:
    """One line for what a task raised: the first error, and how many came with it."""
    leaves = leaf_exceptions(exc)
    more = f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""
    return f"{type(leaves[0]).__name__}: {leaves[0]}{more}"
