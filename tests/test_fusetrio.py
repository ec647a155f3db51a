"""pyfuse3's request loop on the trio stand-in (``mount/fusetrio``).

The two parts the stand-in changes are checked on their own with real descriptors (a burst
skips at most ``_BURST`` waits, then cancellation arrives; an empty descriptor is waited
for; the reader lock excludes and hands over), then a real pyfuse3 filesystem in a child
process serves many concurrent, overlapping reads through it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from ocixfs.mount import fusetrio


def _pipe_with_data() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")
    return read_end, write_end


def test_a_waiting_request_skips_the_wait_up_to_a_burst_then_cancellation_arrives() -> None:
    lowlevel = fusetrio._Lowlevel()
    read_end, write_end = _pipe_with_data()
    returned = 0

    async def main() -> None:
        nonlocal returned
        with trio.CancelScope() as scope:
            scope.cancel()
            for _ in range(fusetrio._BURST + 5):
                await lowlevel.wait_readable(read_end)
                returned += 1

    try:
        trio.run(main)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert returned == fusetrio._BURST


def test_an_empty_descriptor_is_waited_for() -> None:
    lowlevel = fusetrio._Lowlevel()
    read_end, write_end = os.pipe()
    outcome: list[bool] = []

    async def main() -> None:
        with trio.move_on_after(5) as scope:
            await lowlevel.wait_readable(read_end)
        outcome.append(scope.cancelled_caught)
        os.write(write_end, b"x")
        with trio.move_on_after(5) as scope:
            await lowlevel.wait_readable(read_end)
        outcome.append(scope.cancelled_caught)

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert outcome == [True, False]


def test_the_reader_lock_lets_one_task_in_at_a_time_and_hands_over() -> None:
    lock = fusetrio._ReaderLock()
    inside: list[str] = []
    events: list[str] = []

    async def reader(name: str) -> None:
        async with lock:
            inside.append(name)
            assert len(inside) == 1, inside
            events.append(f"in {name}")
            await trio.sleep(1)
            inside.remove(name)
            events.append(f"out {name}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(reader, name)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sorted(events) == sorted(f"{e} {n}" for n in "abc" for e in ("in", "out"))
    assert [e.split()[0] for e in events] == ["in", "out"] * 3


CHILD = """
import errno, os, sys, threading, trio, pyfuse3
from ocixfs.mount import fusetrio

FILES = {i + 2: f"file {i}\\n".encode() * (i + 1) for i in range(64)}

class Slow(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode
        attributes.st_mode = 0o40755 if inode == 1 else 0o100444
        attributes.st_size = len(FILES.get(inode, b""))
        return attributes

    async def lookup(self, parent, name, ctx=None):
        inode = int(name.decode()) + 2
        if parent != 1 or inode not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(inode)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, offset, size):
        await trio.sleep(0.005)  # requests overlap: several reader tasks at once
        return FILES[fh][offset:offset + size]

operations = Slow()
pyfuse3.init(operations, sys.argv[1], set())
fusetrio.install()
assert isinstance(pyfuse3.trio, fusetrio._Trio)

def read_all(wrong):
    for inode, content in FILES.items():
        with open(os.path.join(sys.argv[1], str(inode - 2)), "rb") as f:
            if f.read() != content:
                wrong.append(inode)

async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main, 4, 16)
        wrong = []
        threads = [threading.Thread(target=read_all, args=(wrong,)) for _ in range(12)]
        def run():
            for t in threads: t.start()
            for t in threads: t.join()
        await trio.to_thread.run_sync(run)
        print(len(wrong))
        pyfuse3.terminate()

trio.run(main)
pyfuse3.close()
"""


@pytest.mark.mount
def test_a_real_filesystem_serves_concurrent_overlapping_reads_through_it(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run([sys.executable, "-c", CHILD, os.fspath(mnt)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]
