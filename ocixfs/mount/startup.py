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
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.image.format import Chunk
    from ocixfs.image.tree import Tree
    from ocixfs.mount.profile import ChosenProfile
    from ocixfs.store.spec import StoreSpec

__all__ = ["ImageLoader", "LoadedImage", "PendingLoad"]


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A validated image: its manifest's digest, its tree, the profile to play (None:
    none), the stores (pinned when the image came from a registry), and whether the tree
    came from the host's image index (else the daemon writes one once serving)."""

    digest: str
    tree: Tree
    profile: ChosenProfile | None
    stores: tuple[StoreSpec, ...]
    from_index: bool


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
