"""Naming blob stores: what the user may type for ``--store`` and what it means."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UsageError

__all__ = ["normalize_store"]


def normalize_store(text: str) -> str:
    """An absolute store URL ending in ``/``: http(s)://, file://, or a local directory."""
    scheme = urlsplit(text).scheme
    if scheme in ("http", "https", "file"):
        return text if text.endswith("/") else text + "/"
    if scheme:
        raise UsageError(f"--store {text}: unsupported scheme {scheme!r} (use http, https, file)")
    path = Path(text)
    if not path.is_dir():
        raise UsageError(f"--store {text}: no such directory")
    return Path(os.path.abspath(path)).as_uri() + "/"
