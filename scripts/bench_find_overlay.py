#!/usr/bin/env python3
"""A prototype, measured: metadata from the kernel (EROFS) and file content from ocixfs,
stacked by overlayfs, against the ocixfs mount alone and local disk, for a first `find`.

    sudo venv/bin/python scripts/bench_find_overlay.py [--runs 5] [--image large]

Needs erofs-utils (`apt install erofs-utils`, for mkfs.erofs) and a kernel with overlayfs
data-only lower layers (6.5 or later). Uses the image the start-up benchmark built
(`scripts/bench/run`, work directory /var/tmp/ocixfs-bench or $OCIXFS_BENCH_DIR): its
manifest and local store, and its unpacked root file system as the local-disk reference.

Steps (the metadata image is made once, untimed):

1. `ocixfs mount` the image (`--no-service`, `--prefetch none`, a fresh cache directory).
2. Walk the mount into a placeholder tree: directories and symlinks as they are; each
   regular file empty but for its size, with the overlayfs xattrs that make it a metacopy
   whose data is the same path in a data-only layer (`trusted.overlay.metacopy`,
   `trusted.overlay.redirect`); owners, modes and times copied. Device nodes and FIFOs
   are left out (a prototype).
3. `mkfs.erofs --chunksize` of that tree. Chunked files keep their sizes' zeros in a
   separate blob device; overlayfs never reads them, since data comes from the data
   layer. (A real writer would emit the EROFS image straight from the manifest, with
   holes, as composefs does.)
4. Mount the EROFS image (loop devices) and overlayfs
   `lowerdir=EROFS::OCIXFS,metacopy=on,redirect_dir=follow`, read-only.

Each run drops the kernel's caches before every first `find -ls`: local disk; the ocixfs
mount (a fresh one each run, as `bench_find.py` does); the overlay (with its own fresh
ocixfs mount below it). Then it checks that files read through the overlay equal the
local ones (the first 200 regular files, by bytes). Prints medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import stat
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench_find import OCIXFS, WORK, drop_caches, timed_find


def cold_find(root: Path) -> float:
    drop_caches()
    return timed_find(root)


@contextlib.contextmanager
def ocixfs_mount(image: Path, store: Path, mountpoint: Path, cache: Path) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    subprocess.run([*OCIXFS, "mount", "--no-service", str(image), str(mountpoint), "--store",
                    str(store), "--cache-dir", str(cache), "--prefetch", "none"], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run([*OCIXFS, "umount", str(mountpoint)], check=False)


def placeholder_tree(source: Path, target: Path) -> int:
    """Step 2 of the module docstring; the number of regular files."""
    files = 0
    for directory, names, entries in os.walk(source):
        out = target / os.path.relpath(directory, source)
        out.mkdir(parents=True, exist_ok=True)
        for name in names + entries:
            path, copy = Path(directory) / name, out / name
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                copy.mkdir(exist_ok=True)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), copy)
            elif stat.S_ISREG(st.st_mode):
                with copy.open("xb") as file:
                    file.truncate(st.st_size)
                os.setxattr(copy, "trusted.overlay.metacopy", b"")
                os.setxattr(copy, "trusted.overlay.redirect",
                            ("/" + os.path.relpath(path, source)).encode())
                files += 1
            else:
                continue
            copy_owner_mode_times(st, copy)
    for directory, _, _ in os.walk(source, topdown=False):
        copy_owner_mode_times(os.lstat(directory), target / os.path.relpath(directory, source))
    return files


def copy_owner_mode_times(st: os.stat_result, path: Path) -> None:
    os.lchown(path, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@contextlib.contextmanager
def erofs_mount(image: Path, blob: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    device = subprocess.run(["losetup", "-f", "--show", "-r", str(blob)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,loop,device={device}", str(image),
                        str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@contextlib.contextmanager
def overlay_mount(metadata: Path, data: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"ro,lowerdir={metadata}::{data},metacopy=on,redirect_dir=follow",
                    str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def same_content(reference: Path, root: Path, count: int = 200) -> int:
    """How many of the first ``count`` regular files read the same through ``root``."""
    checked = 0
    for directory, _, names in sorted(os.walk(reference)):
        for name in sorted(names):
            path = Path(directory) / name
            if not path.is_file() or path.is_symlink():
                continue
            relative = path.relative_to(reference)
            if (root / relative).read_bytes() != path.read_bytes():
                raise SystemExit(f"{relative}: different bytes through the overlay")
            checked += 1
            if checked == count:
                return checked
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="large")
    args = parser.parse_args()
    if shutil.which("mkfs.erofs") is None:
        raise SystemExit("needs mkfs.erofs: apt install erofs-utils")
    images = WORK / "images" / args.image
    built = sorted((images / "ocix").glob("*-zstd"))
    if not built:
        raise SystemExit(f"no image under {images}: run scripts/bench/run --images {args.image}")
    image, store = built[-1] / f"{args.image}.ocix", built[-1] / "store"
    reference = images / "ref" / "rootfs"
    with tempfile.TemporaryDirectory(prefix="ocixfs-overlay-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        with ocixfs_mount(image, store, work / "data", work / "cache") as data:
            files = placeholder_tree(data, work / "meta-src")
        subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", "--chunksize=1048576",
                        f"--blobdev={work / 'blob'}", str(work / "meta.erofs"),
                        str(work / "meta-src")], check=True)
        print(f"metadata image: {files:,} regular files, "
              f"{(work / 'meta.erofs').stat().st_size / 1e6:.1f} MB")
        times: dict[str, list[float]] = {"local disk": [], "ocixfs": [], "overlay": []}
        for _ in range(args.runs):
            times["local disk"].append(cold_find(reference))
            with ocixfs_mount(image, store, work / "data", work / "cache") as data:
                times["ocixfs"].append(cold_find(data))
            with (
                ocixfs_mount(image, store, work / "data", work / "cache") as data,
                erofs_mount(work / "meta.erofs", work / "blob", work / "meta") as metadata,
                overlay_mount(metadata, data, work / "root") as root,
            ):
                times["overlay"].append(cold_find(root))
                checked = same_content(reference, root)
        local = statistics.median(times["local disk"])
        print(f"`find -ls` over {args.image}, first walk, caches dropped, medians of "
              f"{args.runs} runs; {checked} files read the same through the overlay\n")
        print("| first `find -ls` | seconds | x local disk |")
        print("|---|---:|---:|")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.3f} | {median / local:.2f} |")


if __name__ == "__main__":
    main()
