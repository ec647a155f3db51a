"""pyfuse3's request loop on trio, without the scheduler passes it does not need.

pyfuse3 looks up everything it uses of trio through its module attribute ``pyfuse3.trio``
(the hook its own asyncio mode uses). ``install()`` puts a stand-in there that is trio in
every respect but two, both on the path every request takes:

- ``Lock``, which pyfuse3 uses only to let one of its reader tasks at a time wait on
  ``/dev/fuse``: free, it is taken without a trip through the scheduler (``trio.Lock``
  makes one even then). Held, a task waits in a ``ParkingLot`` as with trio's.
- ``lowlevel.wait_readable`` of the FUSE descriptor: when a request is already waiting
  (a burst: a start-up's processes, the kernel's readahead), it returns at once instead of
  parking the task until the next epoll pass, up to ``_BURST`` times in a row; then, and
  whenever nothing is waiting, it is trio's, so other tasks still run between requests
  and cancellation is still delivered.

A trip through trio's scheduler costs about as much as answering a LOOKUP from the tree;
a first ``find`` over a mount makes thousands of requests, one at a time.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

__all__ = ["install"]

_BURST = 32


class _ReaderLock:
    """A lock for pyfuse3's reader tasks that costs nothing when free."""

    def __init__(self) -> None:
        self._held = False
        self._waiting = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiting.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        self._waiting.unpark()


class _Lowlevel(types.SimpleNamespace):
    """``trio.lowlevel`` with a ``wait_readable`` that skips the wait when a request is
    already there (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._poll = select.poll()
        self._polled: int | None = None
        self._skipped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        if self._skipped < _BURST and self._ready(fd):
            self._skipped += 1
            return
        self._skipped = 0
        await trio.lowlevel.wait_readable(fd)

    def _ready(self, fd: int) -> bool:
        if self._polled != fd:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
            self._polled = fd
        return bool(self._poll.poll(0))


class _Trio(types.SimpleNamespace):
    """What ``pyfuse3.trio`` names: trio, with ``Lock`` and ``lowlevel`` above."""

    def __init__(self) -> None:
        super().__init__(Lock=_ReaderLock, lowlevel=_Lowlevel())

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> None:
    """Make this process's pyfuse3 use the stand-in (before ``pyfuse3.main``). Idempotent."""
    if not isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = _Trio()  # type: ignore[attr-defined]
