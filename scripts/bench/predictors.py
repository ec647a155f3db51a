"""Cheap predictors of what a start-up reads, for an image no host has a profile of.

The measurement behind the README's "Prefetching and profiles": the benchmark's
``ocixfs-predict`` contender plays what ``elf_closure`` names as a profile from the moment
of the mount, the best a predictor inside the daemon could do (there it fires only once
the program is opened). The ELF predictor won on both links and is built into the mount
(``ocixfs/mount/predict.py``, ``--prefetch auto`` without a profile); the ``__pycache__``
one gains nothing (``pyc_lead_times``) and is not.

- ``elf_closure``: the program a command executes, the interpreter of a ``#!`` script,
  the ELF interpreter (``PT_INTERP``) and the ``DT_NEEDED`` libraries, transitively,
  searched in ``DT_RUNPATH``/``DT_RPATH`` and the default directories (no ld.so.cache).
- ``pyc_lead_times``: for Python's ``__pycache__`` beside an imported ``.py``, how much
  warning the lookup of the ``.py`` gives before the ``.pyc`` is opened (strace of the
  workload on the unpacked reference tree): the most a predictor that fires on the lookup
  can save per module.

``python scripts/bench/predictors.py WORK/images/python`` prints both as JSON.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from images import CHROOT_PATH, IMAGES, _interpreter, _resolve, chroot_env

__all__ = ["elf_closure", "pyc_lead_times", "predicted_profile"]

LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                "/lib", "/usr/lib")
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 1, 5, 15, 29


def _image_path(rootfs: Path, path: str) -> str | None:
    """The canonical path in the image of the regular file ``path`` resolves to."""
    real = _resolve(rootfs, path)
    if real is None or not real.is_file():
        return None
    return "/" + str(real.relative_to(rootfs))


def _which(rootfs: Path, name: str) -> str | None:
    if "/" in name:
        return _image_path(rootfs, name)
    for directory in CHROOT_PATH.split(":"):
        found = _image_path(rootfs, f"{directory}/{name}")
        if found is not None:
            return found
    return None


def _dynamic(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED names, DT_RUNPATH/DT_RPATH directories) of an ELF64 little-endian file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return [], []
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        at = phoff + i * phentsize
        p_type, _f, off, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", data, at)
        if p_type == PT_LOAD:
            loads.append((vaddr, off, filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (off, filesz)
    if dynamic is None:
        return [], []
    tags: list[tuple[int, int]] = []
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        tags.append((tag, value))
    strtab = next((v for t, v in tags if t == DT_STRTAB), None)
    if strtab is None:
        return [], []
    base = next((off + strtab - vaddr for vaddr, off, size in loads
                 if vaddr <= strtab < vaddr + size), None)
    if base is None:
        return [], []

    def string(at: int) -> str:
        end = data.index(b"\0", base + at)
        return os.fsdecode(data[base + at:end])

    needed = [string(v) for t, v in tags if t == DT_NEEDED]
    paths = [d for t, v in tags if t in (DT_RPATH, DT_RUNPATH) for d in string(v).split(":")]
    return needed, [d for d in paths if d.startswith("/")]


def elf_closure(rootfs: Path, argv: Sequence[str]) -> list[str]:
    """The files the kernel and ld.so load to start ``argv`` (the program, a script's
    interpreter, PT_INTERP, DT_NEEDED transitively), in the order a breadth-first load
    opens them; image paths."""
    program = _which(rootfs, argv[0])
    if program is None:
        return []
    order = [program]
    script_interpreter = _interpreter(rootfs / program.lstrip("/"))
    if script_interpreter is not None:
        found = _image_path(rootfs, script_interpreter)
        if found is not None and found not in order:
            order.append(found)
    queue = list(order)
    while queue:
        current = queue.pop(0)
        needed, runpath = _dynamic(rootfs / current.lstrip("/"))
        for name in needed:
            for directory in (*runpath, *LIBRARY_DIRS):
                found = _image_path(rootfs, f"{directory}/{name}")
                if found is not None:
                    if found not in order:
                        order.append(found)
                        queue.append(found)
                    break
    return order


def predicted_profile(rootfs: Path, argv: Sequence[str]) -> bytes:
    """``elf_closure`` as an ocixfs profile (CBOR), one millisecond apart."""
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[2]))
    from ocixfs.mount.profile import Profile, encode_profile

    paths = elf_closure(rootfs, argv)
    encoded: bytes = encode_profile(Profile(tuple((path, n) for n, path in enumerate(paths))))
    return encoded


_CALL = re.compile(r'^\d+\s+(\d+\.\d+)\s+(\w+)\((?:AT_FDCWD, )?"([^"]+)"')


def pyc_lead_times(rootfs: Path, argv: Sequence[str]) -> list[float]:
    """For each ``__pycache__/X.*.pyc`` the workload opens, the seconds since it last
    looked up ``X.py`` (stat or open): the warning a predictor firing on that lookup gets."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        subprocess.run(
            ["strace", "-f", "-qq", "-ttt", "-s", "4096", "-e",
             "trace=openat,newfstatat,stat,lstat,statx", "-o", trace, "chroot", rootfs, *argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            env=chroot_env(), timeout=600, check=True)
        lines = trace.read_text().splitlines()
    last_lookup: dict[str, float] = {}
    leads: list[float] = []
    for line in lines:
        match = _CALL.match(line)
        if match is None:
            continue
        at, call, path = float(match[1]), match[2], match[3]
        if path.endswith(".py"):
            last_lookup[path] = at
        elif call == "openat" and "/__pycache__/" in path and path.endswith(".pyc"):
            directory, name = path.split("/__pycache__/")
            source = f"{directory}/{name.split('.', 1)[0]}.py"
            if source in last_lookup:
                leads.append(at - last_lookup[source])
    return leads


def main(args: Sequence[str]) -> int:
    image_dir = Path(args[0])
    spec = IMAGES[image_dir.name]
    rootfs = image_dir / "ref" / "rootfs"
    closure = elf_closure(rootfs, spec.workload.argv)
    leads = pyc_lead_times(rootfs, spec.workload.argv)
    print(json.dumps({
        "workload": list(spec.workload.argv),
        "elf_closure": closure,
        "elf_closure_bytes": sum((rootfs / p.lstrip("/")).stat().st_size for p in closure),
        "pyc_opened": len(leads),
        "pyc_lead_ms": {
            "median": round(statistics.median(leads) * 1000, 3) if leads else None,
            "max": round(max(leads) * 1000, 3) if leads else None,
        },
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
