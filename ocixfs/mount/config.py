"""One mount's settings, resolved once by the ``mount`` command and passed down whole to
the daemon and its session; nothing below re-derives a setting. No I/O here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ocixfs.config import ReaderConfig
from ocixfs.mount.profile import ChosenProfile
from ocixfs.store.spec import StoreSpec

__all__ = ["MountConfig"]


@dataclass(frozen=True, kw_only=True)
class MountConfig:
    """One mount, as the ``mount`` command resolved it: ``reader`` holds the data path's
    settings (the read deadline, the cache quota, slots for the prefetch workers), and
    ``stores`` the parsed stores in mirror order.

    - ``kernel_flags``: generic mount flags passed through to the kernel (``noexec``, …).
    - ``profile``: what to prefetch, in order, and where it came from (``ocixfs stats``
      says); ``fill_rest``: then
      fetch the rest of the image in the background; ``packs``: fetch the profile's
      blobs as the store's profile packs for it, when it has them (``fetch.packs``).
    - ``predict``: with no profile to play, prefetch the ELF closure of each executable
      as it is opened (``mount.predict``).
    - ``record_profile``: where to save what this mount saw, besides the host's cache.
    - ``uid_shift``/``gid_shift``: added to every owner and group the mount reports (an
      unprivileged container's id base).
    - ``write_index``: the tree was decoded from the manifest; once quiet, the daemon
      keeps it in the host's index (``cache.index``) for the next mount.
    - ``stack``: when this host has the image's EROFS metadata image, the kernel serves
      the metadata from it and the FUSE mount only file contents (``mount.stacking``);
      when not, the daemon writes one for the next mount.
    - ``log_file``: where a background daemon logs; ``remove_routine_log``: remove it at a
      clean unmount if it holds nothing but routine lines (the default log in the runtime
      directory; never a file the user named).
    """

    image: str
    mountpoint: Path
    stores: tuple[StoreSpec, ...]
    cache_dir: Path
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    suid: bool = False
    dev: bool = False
    allow_other: bool = field(default_factory=lambda: os.geteuid() == 0)
    fsname: str = "ocixfs"
    log_file: Path | None = None
    remove_routine_log: bool = False
    debug_fuse: bool = False
    kernel_flags: frozenset[str] = frozenset()
    profile: ChosenProfile | None = None
    fill_rest: bool = False
    predict: bool = False
    packs: bool = True
    record_profile: Path | None = None
    prefetch_concurrency: int = 16
    uid_shift: int = 0
    gid_shift: int = 0
    write_index: bool = False
    stack: bool = False

    def fuse_options(self) -> set[str]:
        """The FUSE mount options: read-only, nodev/nosuid unless asked, permissions
        checked by the kernel, plus the kernel flags."""
        options = {"ro", "default_permissions", "subtype=ocixfs", f"fsname={self.fsname}"}
        options.add("suid" if self.suid else "nosuid")
        options.add("dev" if self.dev else "nodev")
        if self.allow_other:
            options.add("allow_other")
        if self.debug_fuse:
            options.add("debug")
        return options | set(self.kernel_flags)
