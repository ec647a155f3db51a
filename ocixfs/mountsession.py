"""One mounted image inside the daemon's trio run: wires tree, reader, Operations and the
control socket together, and guarantees the FUSE mount is gone when ``serve`` returns.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from .control import ControlServer

if TYPE_CHECKING:
    from .daemon import MountConfig
    from .fs import Operations
    from .reader import Reader
    from .tree import Tree

__all__ = ["MountSession"]

log = logging.getLogger(__name__)


class MountSession:
    """Serve one image at one mountpoint until unmounted or signalled."""

    def __init__(self, config: MountConfig, tree: Tree, image_digest: str) -> None:
        self.config = config
        self.tree = tree
        self.image_digest = image_digest
        self.started = time.monotonic()
        self._ops: Operations | None = None
        self._reader: Reader | None = None

    async def serve(self, ready: Callable[[], None]) -> None:
        from .daemon import mount_options
        from .fs import Operations
        from .reader import ReaderConfig, open_reader

        reader_config = ReaderConfig(read_deadline=self.config.read_deadline)
        async with AsyncExitStack() as stack:
            reader = await stack.enter_async_context(
                open_reader(self.config.stores, self.config.cache_dir, reader_config)
            )
            ops = Operations(self.tree, reader)
            self._ops, self._reader = ops, reader
            control = self._control_server()
            listening = control.bind()
            pyfuse3.init(ops, os.fspath(self.config.mountpoint), mount_options(self.config))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(control.serve, listening)
                    nursery.start_soon(self._stop_on_signals)
                    nursery.start_soon(self._announce_when_serving, ready)
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()
            finally:
                pyfuse3.close(unmount=True)
        log.info("%s: unmounted", self.config.mountpoint)

    async def _announce_when_serving(self, ready: Callable[[], None]) -> None:
        await trio.to_thread.run_sync(os.stat, self.config.mountpoint)
        ready()
        log.info("%s: serving %s", self.config.mountpoint, self.config.image)

    async def _stop_on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: %s, unmounting", self.config.mountpoint, signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    def _control_server(self) -> ControlServer:
        control = ControlServer(self.config.mountpoint)
        control.register("pid", self._pid)
        control.register("stats", self._stats)
        return control

    async def _pid(self, _message: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def _stats(self, _message: dict[str, Any]) -> dict[str, Any]:
        assert self._ops is not None and self._reader is not None
        present = await trio.to_thread.run_sync(self._local_presence)
        return {
            "mountpoint": os.fspath(self.config.mountpoint),
            "image": self.config.image,
            "image_digest": self.image_digest,
            "stores": list(self.config.stores),
            "cache_dir": os.fspath(self.config.cache_dir),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "fs": self._ops.statistics().as_dict(),
            "reader": self._reader.statistics().as_dict(),
            "image_files": present,
        }

    def _local_presence(self) -> dict[str, int]:
        """How much of the image's content is already in the local cache (runs in a thread)."""
        assert self._reader is not None
        files = files_local = size = size_local = 0
        for node in self.tree.iter_files():
            files += 1
            size += node.size
            blobs = node.blobs
            if all(self._reader.is_cached(chunk) for chunk in blobs):
                files_local += 1
                size_local += node.size
        return {
            "files": files, "files_local": files_local, "bytes": size, "bytes_local": size_local
        }
