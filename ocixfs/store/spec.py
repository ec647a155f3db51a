"""Naming blob stores: what the user may type for ``--store`` and the typed spec it becomes.

A store is one of:

- ``HttpStore``: an ``http://`` or ``https://`` URL with a host, without
  ``user:password@`` (refused: a command line is visible to every user; credentials go in
  a ``--store-auth`` file),
- ``LocalStore``: a ``file://`` URL of a local path (``file:///DIR`` or
  ``file://localhost/DIR``), or a plain directory: absolute for ``parse_stores``; on the
  command line (``relative=True``) also a relative one, which must exist and is made
  absolute (the daemon runs in ``/``),
- ``RegistryStore``: an image pushed to an OCI registry, named in skopeo's transport
  syntax ``docker://HOST[:PORT]/REPO[:TAG]`` or ``docker://HOST[:PORT]/REPO@sha256:HEX``
  (no tag and no digest: ``latest``; a first component without ``.`` or ``:`` that is not
  ``localhost`` means Docker Hub, as docker reads it). Its blobs are found through the
  blob index the pushed artifact carries (``store.registry``).

This module is the one parser of store names; everything past the command line handles
``StoreSpec`` values. Adding a store kind means a spec class here (and its case in
``parse_store``) and a ``Source`` for it in ``remote``. Errors are ``UsageError`` with a
one-line message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from ocixfs.errors import UsageError
from ocixfs.http import redact, refuse_credentials
from ocixfs.image.loading import is_url
from ocixfs.store.layout import looks_like_store

__all__ = [
    "HttpStore",
    "LocalStore",
    "RegistryStore",
    "StoreSpec",
    "default_store_for",
    "is_registry_ref",
    "normalize_store",
    "parse_registry_ref",
    "parse_store",
    "parse_stores",
    "stores_or_default",
]


@dataclass(frozen=True, slots=True)
class LocalStore:
    """A store directory on this host, read with plain file I/O."""

    path: Path

    @property
    def label(self) -> str:
        """How logs, messages and statistics name it."""
        return f"file://{self.path}"


@dataclass(frozen=True, slots=True)
class HttpStore:
    """A store under an http(s) base URL."""

    url: str

    @property
    def label(self) -> str:
        """How logs, messages and statistics name it: the URL without credentials."""
        return redact(self.url)


@dataclass(frozen=True, slots=True)
class RegistryStore:
    """An OCIX artifact in an OCI registry: ``host`` (with its port, as typed),
    ``repository``, and ``reference`` (a tag or ``sha256:HEX``). ``tls_verify=False``
    allows plain http (loopback hosts always may, as docker allows); ``login`` is
    the user and password read from the auth files (``store.registryauth``), never shown."""

    host: str
    repository: str
    reference: str
    tls_verify: bool = True
    login: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How logs, messages and statistics name it: the reference as typed, no secret."""
        separator = "@" if self.pinned else ":"
        return f"docker://{self.host}/{self.repository}{separator}{self.reference}"

    @property
    def pinned(self) -> bool:
        """Whether ``reference`` is a manifest digest (its content cannot change)."""
        return self.reference.startswith("sha256:")

    @property
    def loopback(self) -> bool:
        """Whether the registry runs on this host (plain http is allowed there)."""
        name = self.host.rpartition(":")[0] if _PORT.search(self.host) else self.host
        if name.strip("[]") == "localhost":
            return True
        try:
            return ipaddress.ip_address(name.strip("[]")).is_loopback
        except ValueError:
            return False


StoreSpec = LocalStore | HttpStore | RegistryStore

_REGISTRY_SCHEME = "docker://"
_PORT = re.compile(r":[0-9]{1,5}$")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DOCKER_HUB = "docker.io"


def is_registry_ref(text: str) -> bool:
    """Whether ``text`` names an image in a registry (``docker://…``)."""
    return text.startswith(_REGISTRY_SCHEME)


def parse_registry_ref(text: str, what: str = "--store") -> RegistryStore:
    """``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` as a ``RegistryStore``. Raises a
    one-line ``UsageError`` naming ``what`` (the text is shown only when it cannot hold
    a password: credentials belong in an auth file)."""
    rest = text.removeprefix(_REGISTRY_SCHEME)
    shown = text if "@" not in rest.split("/", 1)[0] else "docker://…"
    problem = f"{what} {shown}: not a registry reference (docker://HOST[:PORT]/REPO[:TAG])"
    name, at, digest = rest.partition("@")
    tag = "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    first, _, path = name.partition("/")
    if not path or ("." not in first and ":" not in first and first != "localhost"
                    and "[" not in first):
        first, path = _DOCKER_HUB, name  # docker's reading of "ubuntu" and "user/app"
    if first == _DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    valid = (_HOST.fullmatch(first) and _REPOSITORY.fullmatch(path) and _TAG.fullmatch(tag)
             and (not at or _DIGEST.fullmatch(digest)))
    if not valid:
        raise UsageError(problem)
    return RegistryStore(first, path, digest if at else tag)


def parse_store(text: str, *, relative: bool = False) -> StoreSpec:
    """One store name. A plain path is made absolute and must be an existing directory if
    ``relative`` (the command line); otherwise it must be absolute and is not checked."""
    shown = redact(text) if "@" in text else text  # never show a password
    try:
        parts = urlsplit(text)
    except ValueError:
        raise UsageError(f"--store {shown}: not a valid URL") from None
    if parts.scheme in ("http", "https"):
        if parts.hostname and _valid_url(text):
            refuse_credentials(text, "--store")
            return HttpStore(text)
        raise UsageError(f"--store {shown}: not a valid URL")
    if is_registry_ref(text):
        return parse_registry_ref(text)
    if parts.scheme == "file":
        if parts.netloc in ("", "localhost") and parts.path:
            return LocalStore(Path(unquote(parts.path)))
        raise UsageError(f"--store {shown}: a file:// URL must name a local path (file:///DIR)")
    if parts.scheme:
        raise UsageError(
            f"--store {shown}: unsupported scheme {parts.scheme!r} (use http, https, file, "
            "docker)"
        )
    if relative:
        if not Path(text).is_dir():
            raise UsageError(f"--store {text}: no such directory")
        return LocalStore(Path(os.path.abspath(text)))
    if not os.path.isabs(text):
        raise UsageError(f"--store {shown}: a directory must be given as an absolute path")
    return LocalStore(Path(text))


def parse_stores(texts: Sequence[str], *, relative: bool = False) -> list[StoreSpec]:
    """Store names in mirror order (see ``parse_store``); at least one. Raises ``UsageError``."""
    if not texts:
        raise UsageError("no blob store given")
    return [parse_store(text, relative=relative) for text in texts]


def normalize_store(text: str) -> str:
    """An absolute store URL ending in ``/`` for a configuration file: http(s):// and
    file:// URLs as typed (plus the ``/``), a local directory (which must exist) as its
    absolute ``file://`` URL; a registry reference as parsed."""
    store = parse_store(text, relative=True)
    if isinstance(store, RegistryStore):
        return store.label
    if isinstance(store, LocalStore) and not urlsplit(text).scheme:  # a plain directory
        return store.path.as_uri() + "/"
    return text if text.endswith("/") else text + "/"


def default_store_for(source: str) -> str | None:
    """The store beside a manifest (``dir/`` of ``dir/image.ocix``) when it looks like one;
    an image in a registry is its own store."""
    if is_registry_ref(source):
        return source
    if is_url(source):
        return source.rsplit("/", 1)[0] + "/"
    parent = Path(source).resolve().parent
    if looks_like_store(parent):
        return parent.as_uri()
    return None


def stores_or_default(texts: Sequence[str], image: str) -> list[StoreSpec]:
    """The stores named on the command line (``relative=True``), or else the store beside
    the image. Raises ``UsageError`` when there is neither, or when the image's URL
    carries credentials (checked here first: the store beside it would inherit them)."""
    if is_url(image):
        refuse_credentials(image, "IMAGE")
    if not texts:
        default = default_store_for(image)
        if default is None:
            raise UsageError("no blob store: pass --store URL (or put blobs/ beside the manifest)")
        texts = [default]
    return parse_stores(texts, relative=True)


def _valid_url(url: str) -> bool:
    try:
        httpx.URL(url)
        urlsplit(url).port  # noqa: B018 -- raises ValueError when out of range
    except (httpx.InvalidURL, ValueError):
        return False
    return True
