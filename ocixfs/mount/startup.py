"""The image a mount daemon serves, loaded by the daemon itself while it starts.

The ``mount`` command checks its options and forks the daemon at once; the daemon loads
the manifest (download, digest, decode or image index) in a thread of its own
(``PendingLoad``) while its trio run opens the cache and the stores. A profile that names
its pack set (``Profile.pack``) is known before the manifest has arrived (a file given
with ``--prefetch FILE``, or ``IMAGE.profile`` downloaded beside it), so the pack set is
asked for then, and the start-up's files stream in while the manifest is still on its
way. Every blob of a pack is verified by its own hash, so nothing depends on the manifest
for that; the plan the manifest then yields decides what is used (``Prefetcher``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.image.format import Chunk
    from ocixfs.image.tree import Tree
    from ocixfs.mount.profile import ChosenProfile
    from ocixfs.store.spec import StoreSpec

__all__ = ["ImageLoader", "LoadedImage", "PendingLoad", "StoreChecks"]

log = logging.getLogger(__name__)


class StoreChecks:
    """A first look at each store (``check`` returns None when it answered, else why
    not), each in a thread of its own started now, told of when the mount is ready.

    A warm mount must not wait on the network for a warning, so ``report`` waits for
    nothing: a store that has not answered by then is one warning line on stderr (the
    caller of ``mount`` reads it); one still being asked is logged when it has answered
    (the daemon's log). A refused connection answers at once, well before any mount is
    ready."""

    def __init__(self, labels: list[str], check: Callable[[int], str | None]) -> None:
        self._labels = labels
        self._results: list[Future[str | None]] = [Future() for _ in labels]
        for index in range(len(labels)):
            threading.Thread(target=self._run, args=(check, index), daemon=True,
                             name="ocixfs-probe").start()

    def _run(self, check: Callable[[int], str | None], index: int) -> None:
        try:
            self._results[index].set_result(check(index))
        except BaseException as exc:  # a failed look is an answer of its own
            self._results[index].set_result(f"{type(exc).__name__}: {exc}")

    def report(self) -> None:
        """Warn now of every store that did not answer; later of the ones still asked."""
        for label, result in zip(self._labels, self._results, strict=True):
            if result.done():
                self._warn(label, result, late=False)
            else:
                result.add_done_callback(partial(self._warn, label, late=True))

    @staticmethod
    def _warn(label: str, result: Future[str | None], *, late: bool) -> None:
        problem = result.result()
        if problem is None:
            return
        line = (f"store {label} did not answer ({problem}); files not in the cache cannot "
                "be read until it does")
        if late:
            log.warning("%s", line)
        else:
            print(f"ocixfs: warning: {line}", file=sys.stderr)


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A validated image: its manifest's digest, its tree, the profile to play (None:
    none), the stores (pinned when the image came from a registry), and whether the tree
    came from the host's image index (else the daemon writes one once serving), and the
    look at the stores, reported once the mount is ready."""

    digest: str
    tree: Tree
    profile: ChosenProfile | None
    stores: tuple[StoreSpec, ...]
    from_index: bool
    store_checks: StoreChecks | None = field(default=None, compare=False)


PlanSeen = Callable[[tuple["Chunk", ...]], None]
ImageLoader = Callable[[PlanSeen], LoadedImage]
"""Loads the image (blocking; raises ``OcixError`` with the user's one line), calling its
argument, from any thread, as soon as it knows the pack plan of the profile it will play."""


class PendingLoad:
    """``loader`` running in a thread started now (before the daemon's trio run, even
    before its modules are imported); trio tasks await the pack plan and the result."""

    def __init__(self, loader: ImageLoader) -> None:
        self._plan: Future[tuple[Chunk, ...]] = Future()
        self._result: Future[LoadedImage] = Future()
        threading.Thread(target=self._run, args=(loader,), name="ocixfs-load",
                         daemon=True).start()

    def _run(self, loader: ImageLoader) -> None:
        try:
            loaded = loader(self._plan_seen)
        except BaseException as exc:  # handed to the awaiting task, raised there
            self._plan_seen(())
            self._result.set_exception(exc)
        else:
            self._plan_seen(())  # the plan is always known before the result
            self._result.set_result(loaded)

    def _plan_seen(self, chunks: tuple[Chunk, ...]) -> None:
        """The first plan named wins; the loader's end names none if none came."""
        with contextlib.suppress(InvalidStateError):  # already named
            self._plan.set_result(chunks)

    async def plan(self) -> tuple[Chunk, ...]:
        """The pack plan of the profile to play, once known (empty: none)."""
        import trio

        return await trio.to_thread.run_sync(self._plan.result, abandon_on_cancel=True)

    async def result(self) -> LoadedImage:
        """The loaded image; raises what the loader raised."""
        import trio

        return await trio.to_thread.run_sync(self._result.result, abandon_on_cancel=True)
