"""Stress (issue 5): many concurrent readers over a real mount while both mirrors fail and
recover, and blobs are evicted from the cache under the daemon's feet. Every byte a reader
gets is compared with the source: a read may fail (EIO) while the mirrors are broken, or
return fewer bytes than asked (the right ones), but it may never return wrong bytes; the
cache may never hold an unverified blob; the daemon must survive; and once the mirrors
recover everything must read right again.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from tests.faultserver import Fault, FaultServer
from tests.mounting import Mount, needs_fuse, wait_for
from tests.reliabilitykit import mount_args, read_or_errno, write_image

pytestmark = [needs_fuse, pytest.mark.mount]

KiB, MiB = 1 << 10, 1 << 20
READERS = 12
CHAOS_SECONDS = 15.0

# (fault on mirror A, fault on mirror B); None = healthy, "down" = server stopped
PHASES: list[tuple[Fault | str | None, Fault | str | None]] = [
    (Fault(status=500), None),
    ("down", Fault(tamper=True)),
    (None, Fault(truncate=777)),
    (Fault(reset=3000), Fault(stall=0.3)),
    (Fault(tamper=True), "down"),
    (Fault(stall_body=0.4, stall_after=1000), Fault(status=503)),
    (None, None),
]


def _files(rng: random.Random) -> dict[str, bytes]:
    files = {f"/small/{i:03}": rng.randbytes(rng.choice([1, 100, 4 * KiB, 40 * KiB, 90 * KiB]))
             for i in range(400)}
    files.update({f"/big/{i}": rng.randbytes(2 * MiB + i * 1000) for i in range(4)})
    return files


def _set(server: FaultServer, state: Fault | str | None) -> None:
    if state == "down":
        server.stop()
        return
    server.start()
    server.clear()
    if isinstance(state, Fault):
        server.fault("*", state)


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.wrong: list[str] = []

    def add(self, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if problem is not None:
                self.wrong.append(problem)


def _reader(root: Path, files: dict[str, bytes], stop: threading.Event, tally: _Tally,
            seed: int) -> None:
    rng = random.Random(seed)
    paths = sorted(files)
    while not stop.is_set():
        path = rng.choice(paths)
        content = files[path]
        offset = rng.randrange(len(content))
        length = rng.choice([1, 4 * KiB, 128 * KiB, len(content)])
        try:
            fd = os.open(root / path[1:], os.O_RDONLY)
            try:  # drop the page cache, so the read reaches the daemon again
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.EIO:
                tally.add("eio")
            else:
                tally.add("other-error", f"{path}: {exc!r}")
            continue
        expected = content[offset : offset + length]
        if data == expected:
            tally.add("ok")
        elif data and data == expected[: len(data)]:
            # the kernel splits a read into page-aligned FUSE requests: when a later one
            # fails, read() returns the bytes of those that succeeded (right ones)
            tally.add("short")
        else:
            tally.add("wrong", f"{path} [{offset}:+{length}]: got {len(data)} wrong bytes")


def _reads_right(root: Path, path: str, content: bytes) -> Callable[[], bool]:
    return lambda: read_or_errno(root / path[1:]) == content


def _evict(cache: Path, rng: random.Random) -> None:
    """What a quota sweep of another process does: unlink some cached blobs."""
    blobs = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    for blob in rng.sample(blobs, len(blobs) // 4):
        blob.unlink(missing_ok=True)


def test_concurrent_readers_while_mirrors_fail_and_recover(tmp_path: Path) -> None:
    rng = random.Random(5)
    files = _files(rng)
    image = write_image(tmp_path / "image", files, chunk_size=512 * KiB)
    cache = tmp_path / "cache"
    tally = _Tally()
    stop = threading.Event()
    with FaultServer(image.store) as first, FaultServer(image.store) as second:
        _set(first, PHASES[0][0])
        with Mount(image.ocix, tmp_path / "mnt", *mount_args(
            [first.url, second.url], cache, "--deadline", "4", "--timeout", "1"
        )) as mount:
            readers = [threading.Thread(target=_reader,
                                        args=(mount.mountpoint, files, stop, tally, seed))
                       for seed in range(READERS)]
            for thread in readers:
                thread.start()
            try:
                ends = time.monotonic() + CHAOS_SECONDS
                phase = 0
                while time.monotonic() < ends:
                    state_a, state_b = PHASES[phase % len(PHASES)]
                    _set(first, state_a)
                    _set(second, state_b)
                    if phase % 3 == 2:
                        _evict(cache, rng)
                    phase += 1
                    time.sleep(0.5)  # how long each phase lasts (pacing, not an assertion)
            finally:
                stop.set()
                for thread in readers:
                    thread.join(timeout=120)
            _set(first, None)
            _set(second, None)

            assert tally.wrong == [], tally.wrong[:5]
            assert tally.counts["ok"] > 200, tally.counts
            stats = mount.stats()
            assert stats["pid"] == mount.pid
            reader_stats = stats["reader"]
            assert isinstance(reader_stats, dict) and sum(reader_stats["errors"].values()) > 0

            for path in files:  # the mirrors are healthy again
                wait_for(_reads_right(mount.mountpoint, path, files[path]), timeout=60,
                         what=f"{path} after recovery")
    blobs = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    assert all(blake3.blake3(p.read_bytes()).hexdigest() == p.name for p in blobs)
    assert not list((cache / "tmp").iterdir())
