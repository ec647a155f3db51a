"""Shared fixtures. Test tiers by how much of the stack they need:

- format, tree, profile, build: pure functions and files, no FUSE, no network;
- cache, fetcher, reader: trio + real HTTP servers from ``tests/faultserver.py``;
- fs_ops: the pyfuse3 Operations called directly (no kernel);
- mount (``@pytest.mark.mount``): the ``ocixfs`` console script mounting real FUSE
  filesystems, served by nginx or the fault server; teardown always unmounts.
"""

from __future__ import annotations

import faulthandler

faulthandler.enable()
