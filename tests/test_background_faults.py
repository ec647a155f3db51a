"""A bug in a mount's background work (prefetch, the control socket) is logged, counted in
``stats`` and stops that task alone: the mount keeps serving reads.

The bug is real code that raises: the daemon is started by a small wrapper that replaces
``Prefetcher._worker`` with one that fails on its first blob, then runs ``ocixfs mount``
exactly as the console script would (the daemon forks from it, so it inherits the bug).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import force_unmount, is_mounted, run_ocixfs, wait_for
from tests.reliabilitykit import write_image

pytestmark = [pytest.mark.mount]

FILES = {f"/data/file{i}.txt": f"content {i}\n".encode() * 50 for i in range(8)}

BUGGY_OCIXFS = """\
import sys
import ocixfs.mount.prefetch

async def broken_worker(self, queue):
    for _chunk in queue:
        raise RuntimeError("injected bug in the prefetcher")

ocixfs.mount.prefetch.Prefetcher._worker = broken_worker
from ocixfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def stats(mountpoint: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run_ocixfs("stats", os.fspath(mountpoint), "--json").stdout)
    return data


def test_a_prefetch_bug_stops_prefetching_but_not_the_mount(tmp_path: Path) -> None:
    image = write_image(tmp_path / "image", FILES)
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    command = [sys.executable, "-c", BUGGY_OCIXFS, "mount", os.fspath(image.ocix),
               os.fspath(mnt), "--store", image.store.as_uri(), "--cache-dir",
               os.fspath(tmp_path / "cache"), "--prefetch", "all", "--log-file", os.fspath(log)]
    started = subprocess.run(command, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert is_mounted(mnt)
        wait_for(lambda: stats(mnt)["background_failures"] == {"prefetch": 1},
                 what="the prefetcher to stop")
        for path, content in FILES.items():
            assert (mnt / path[1:]).read_bytes() == content
        assert stats(mnt)["background_failures"] == {"prefetch": 1}
        assert stats(mnt)["fs"]["reads"] >= len(FILES)
        logged = started.stderr + log.read_text()  # the daemon logs to stderr until ready
        assert logged.count("injected bug in the prefetcher") == 1
        assert "prefetch stopped by an internal error (RuntimeError: injected bug" in logged
        run_ocixfs("umount", os.fspath(mnt), timeout=60)
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
