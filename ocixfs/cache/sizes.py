"""Sizes as users type them: ``10G``, ``20%``, ``1.5TiB`` (K, M, G, T, P are powers of
1024 here, as in ``df -h``). Sizes ocixfs shows are decimal: ``progress.format_bytes``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ocixfs.config import CacheQuota
from ocixfs.errors import UsageError

__all__ = ["filesystem_size", "parse_quota", "parse_size"]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """``10G``, ``500M``, ``1.5TiB``, ``4096``: bytes, K/M/G/T/P being powers of 1024 (a
    trailing ``B`` or ``iB`` is allowed). Raises ``UsageError``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"invalid size {text!r} (use e.g. 10G, 500M or 20%)")
    size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def parse_quota(text: str) -> CacheQuota:
    """A size (see ``parse_size``), ``N%`` of the filesystem holding the cache, or
    ``unlimited``. Raises ``UsageError``."""
    spec = text.strip().lower()
    if spec in ("unlimited", "none"):
        return CacheQuota(share=None, cap=None)
    if spec.endswith("%"):
        try:
            share = float(spec[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise UsageError(f"cache size {text!r}: a share must be more than 0 and at most 100%")
        return CacheQuota(share=share / 100, cap=None)
    return CacheQuota(size=parse_size(text))


def filesystem_size(path: Path) -> int:
    """The total size of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize
