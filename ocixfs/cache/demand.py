"""Which processes on the host are fetching for a waiting read right now.

Every process that fetches into a cache opens ``CACHE/demand.lock`` once. While it has
on-demand fetches (a program waits on a read), it holds an open-file-description read
lock on the file's first byte; ``others_busy()`` asks the kernel whether any *other*
open file description holds one (a lock of one's own never conflicts with oneself). The
schedulers of all mounts on the host use this to start background fetches (profile
playback, ``--prefetch all``) only while no mount is waiting on a read, so on-demand reads
come first host-wide, not just within one mount. A process that dies drops its lock with
its descriptor: nothing to clean up, nothing to go stale.

The calls are single non-blocking ``fcntl``s on a local file, cheap enough for the trio
thread. Errors are not fatal to anyone: a cache whose lock file cannot be opened gives a
``HostDemand`` that never reports others (each mount then orders only its own fetches).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from pathlib import Path

__all__ = ["HostDemand"]

log = logging.getLogger(__name__)

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t)
_FLOCK = struct.Struct("hh4xqqi4x")


class HostDemand:
    """This process's side of the host-wide on-demand marker in ``lock_file``."""

    def __init__(self, lock_file: Path) -> None:
        self._busy = False
        try:
            self._fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                               | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            log.info("cache: %s: %s; on-demand reads come first within this mount only",
                     lock_file, exc.strerror)
            self._fd = -1

    def set_busy(self, busy: bool) -> None:
        """Say whether this process has on-demand fetches (cheap when nothing changes)."""
        if busy is self._busy or self._fd < 0:
            return
        kind = fcntl.F_RDLCK if busy else fcntl.F_UNLCK
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 1, 0))
        except OSError as exc:  # a read lock never conflicts with read locks
            log.debug("cache: on-demand marker: %s", exc)
            return
        self._busy = busy

    def others_busy(self) -> bool:
        """Whether another process (or another open of the file) has on-demand fetches."""
        if self._fd < 0:
            return False
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        try:
            answer = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, probe)
        except OSError as exc:
            log.debug("cache: on-demand marker: %s", exc)
            return False
        return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # drops the lock
