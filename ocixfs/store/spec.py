"""Naming blob stores: what the user may type for ``--store`` and what it means.

A store is one of:

- an ``http://`` or ``https://`` URL with a host (credentials in it are allowed; they are
  never shown in messages),
- a ``file://`` URL of a local path (``file:///DIR`` or ``file://localhost/DIR``),
- a plain directory: absolute for ``parse_stores``; ``normalize_store`` (the command line)
  also takes a relative one, which must exist, and makes it absolute.

This module is the one parser of store names. ``normalize_store`` turns what the user typed
into the URL the commands pass on (the daemon runs in ``/``, so a relative path must be
resolved first); ``parse_stores`` turns a list of store names into what the fetcher's
sources are built from. Both raise ``UsageError`` with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from ocixfs.errors import UsageError
from ocixfs.store.http import redact

__all__ = ["normalize_store", "parse_stores"]


def normalize_store(text: str) -> str:
    """An absolute store URL ending in ``/``: http(s):// and file:// URLs as typed (plus
    the ``/``), a local directory (which must exist) as its absolute ``file://`` URL."""
    store = _parse(text, relative=True)
    if isinstance(store, Path) and not urlsplit(text).scheme:  # a plain directory
        if not Path(text).is_dir():
            raise UsageError(f"--store {text}: no such directory")
        return store.as_uri() + "/"
    return text if text.endswith("/") else text + "/"


def parse_stores(stores: Sequence[str]) -> list[str | Path]:
    """Check store names, in mirror order: an http(s) URL stays a string, a ``file://``
    URL or an absolute path becomes a ``Path``. Raises ``UsageError``."""
    if not stores:
        raise UsageError("no blob store given")
    return [_parse(store, relative=False) for store in stores]


def _parse(text: str, *, relative: bool) -> str | Path:
    """One store name: an http(s) URL as a string, a local directory as a ``Path``. A
    plain path is made absolute (``os.path.abspath``) if ``relative``, else it must be
    absolute and is taken as it is."""
    shown = redact(text) if "@" in text else text  # never show a password
    try:
        parts = urlsplit(text)
    except ValueError:
        raise UsageError(f"--store {shown}: not a valid URL") from None
    if parts.scheme in ("http", "https"):
        if parts.hostname and _valid_url(text):
            return text
        raise UsageError(f"--store {shown}: not a valid URL")
    if parts.scheme == "file":
        if parts.netloc in ("", "localhost") and parts.path:
            return Path(unquote(parts.path))
        raise UsageError(f"--store {shown}: a file:// URL must name a local path (file:///DIR)")
    if parts.scheme:
        raise UsageError(
            f"--store {shown}: unsupported scheme {parts.scheme!r} (use http, https, file)"
        )
    if relative:
        return Path(os.path.abspath(text))
    if not os.path.isabs(text):
        raise UsageError(f"--store {shown}: a directory must be given as an absolute path")
    return Path(text)


def _valid_url(url: str) -> bool:
    try:
        httpx.URL(url)
        urlsplit(url).port  # noqa: B018 -- raises ValueError when out of range
    except (httpx.InvalidURL, ValueError):
        return False
    return True
