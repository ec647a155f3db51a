"""Naming blob stores: what the user may type for ``--store`` and the typed spec it becomes.

A store is one of:

- ``HttpStore``: an ``http://`` or ``https://`` URL with a host, without
  ``user:password@`` (refused: a command line is visible to every user; credentials go in
  a ``--store-auth`` file),
- ``LocalStore``: a ``file://`` URL of a local path (``file:///DIR`` or
  ``file://localhost/DIR``), or a plain directory: absolute for ``parse_stores``; on the
  command line (``relative=True``) also a relative one, which must exist and is made
  absolute (the daemon runs in ``/``).

This module is the one parser of store names; everything past the command line handles
``StoreSpec`` values. Adding a store kind means a spec class here (and its case in
``parse_store``) and a ``Source`` for it in ``remote``. Errors are ``UsageError`` with a
one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
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
    "StoreSpec",
    "default_store_for",
    "normalize_store",
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


StoreSpec = LocalStore | HttpStore


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
    if parts.scheme == "file":
        if parts.netloc in ("", "localhost") and parts.path:
            return LocalStore(Path(unquote(parts.path)))
        raise UsageError(f"--store {shown}: a file:// URL must name a local path (file:///DIR)")
    if parts.scheme:
        raise UsageError(
            f"--store {shown}: unsupported scheme {parts.scheme!r} (use http, https, file)"
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
    absolute ``file://`` URL."""
    store = parse_store(text, relative=True)
    if isinstance(store, LocalStore) and not urlsplit(text).scheme:  # a plain directory
        return store.path.as_uri() + "/"
    return text if text.endswith("/") else text + "/"


def default_store_for(source: str) -> str | None:
    """The store beside a manifest (``dir/`` of ``dir/image.ocix``) when it looks like one."""
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
