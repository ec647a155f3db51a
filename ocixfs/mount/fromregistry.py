"""Mounting an image straight from an OCI registry (``ocixfs mount docker://… MNT``).

The command reads the artifact the reference names (``store.registry.fetch_image``):
the OCIX manifest it carries is pinned (``--digest``) and decoded like any other, its
profile is the one "beside" the image, and every store that names the image's own
reference is pinned to the artifact's digest, so the daemon's blob index is the one
the manifest came with even if the tag moves meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ocixfs.config import FetchConfig
from ocixfs.errors import FormatError
from ocixfs.image.format import DEFAULT_LIMITS
from ocixfs.image.loading import PinnedBytes, pin
from ocixfs.mount.profile import MAX_PROFILE_BYTES, Profile, decode_profile
from ocixfs.store.registry import fetch_image
from ocixfs.store.registryauth import with_login
from ocixfs.store.spec import RegistryStore, StoreSpec, parse_registry_ref

__all__ = ["RegistryLoad", "load_from_registry", "with_logins"]

log = logging.getLogger(__name__)


def with_logins(stores: Sequence[StoreSpec], *, tls_verify: bool) -> list[StoreSpec]:
    """``stores`` with each registry's login read (once, now) and ``tls_verify`` set."""
    return [with_login(store, tls_verify=tls_verify) if isinstance(store, RegistryStore)
            else store for store in stores]


@dataclass(frozen=True, slots=True)
class RegistryLoad:
    """An image read from a registry, its profile (None: none or unusable), and the
    stores to mount with (the image's own reference pinned)."""

    image: PinnedBytes
    profile: Profile | None
    stores: tuple[StoreSpec, ...]


def load_from_registry(
    source: str, digest: str | None, fetch: FetchConfig, stores: Sequence[StoreSpec],
    *, tls_verify: bool,
) -> RegistryLoad:
    """Read the image ``source`` names. Raises ``RegistryError``, ``FormatError`` or
    ``UsageError`` (one line each)."""
    store = with_login(parse_registry_ref(source, "IMAGE"), tls_verify=tls_verify)
    fetched = fetch_image(store, fetch, DEFAULT_LIMITS.max_bytes, MAX_PROFILE_BYTES)
    image = pin(fetched.manifest, source, expected_digest=digest)
    profile = None
    if fetched.profile is not None:
        try:
            profile = decode_profile(fetched.profile, source=f"{store.label} (profile)")
        except FormatError as exc:
            log.warning("ignoring %s", exc)
    pinned = tuple(replace(spec, reference=fetched.store.reference)
                   if isinstance(spec, RegistryStore) and spec == store else spec
                   for spec in stores)
    return RegistryLoad(image, profile, pinned)
